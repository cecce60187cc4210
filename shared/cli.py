"""`overlord-agent`: the one entry point (api, worker, status, drain, run). Configured only by settings."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from shared.settings import Settings, get_settings


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:
        for error in exc.errors():
            print(f"overlord-agent: invalid settings: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from api.main import create_app

    settings = _settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                proxy_headers=True, server_header=False)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.runner import run_worker

    return run_worker(_settings(), name=str(args.name) if args.name else None, burst=bool(args.burst))


def cmd_status(args: argparse.Namespace) -> int:
    from shared.ops import print_status

    return print_status(_settings(), as_json=bool(args.json))


def cmd_drain(args: argparse.Namespace) -> int:
    from shared.ops import drain

    return drain(_settings(), undo=bool(args.undo), wait_s=float(args.wait))


def cmd_run(args: argparse.Namespace) -> int:
    from devtools.stack import run_stack

    return int(run_stack())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overlord-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("api", help="serve the HTTP API on AGENT_HOST:AGENT_PORT").set_defaults(func=cmd_api)
    worker = sub.add_parser("worker", help="run one RQ worker on AGENT_QUEUE")
    worker.add_argument("--name", help="worker name (unique per host), e.g. the systemd instance")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(func=cmd_worker)
    status = sub.add_parser("status", help="queue and worker status")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    drain = sub.add_parser("drain", help="stop admitting asks and wait until none is queued or running")
    drain.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the queue to empty (0: don't)")
    drain.add_argument("--undo", action="store_true", help="admit asks again")
    drain.set_defaults(func=cmd_drain)
    sub.add_parser("run", help="the whole local stack: Redis, API, AGENT_WORKERS workers").set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
