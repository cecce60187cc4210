"""Before and after: the code as it was before the changes made for the missed targets, restored at run
time, measured against the code as it is, in the same run. Nothing in api/, worker/ or shared/ is edited:
the launcher (`python -m bench.whatif api|worker --patch P,...`) patches the modules in its own process,
then runs `overlord-agent api|worker` as usual.

Patches (each restores one earlier version):
  sync-deps        `get_context` and `same_origin_or_allowed` (api/deps.py) as plain `def`: FastAPI then
                   calls each through run_in_threadpool, a thread-pool hop per dependency.
  blocking-enqueue RQ's own `enqueue(..., unique=True)` on the synchronous client (api/enqueue.py now
                   records RQ's commands and sends them in one async Lua call).
  plain-http       uvicorn on asyncio's loop and h11 (no uvloop, no httptools); compared with a floor
                   served the same way.
  preexec-spawn    claude started with `preexec_fn=die_with_parent` (subprocess forks the whole horse)
                   instead of through `setpriv --pdeathsig KILL` (vfork).
Run the comparison: `python -m bench.whatif`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, get_args

import httpx
import redis
from fastapi import Request

from api.deps import ContextDep
from bench import admission, dispatch, polling
from bench.common import (
    PERMISSIVE,
    BenchError,
    Section,
    Stack,
    WrkResult,
    bench_settings,
    flush,
    md_table,
    median_result,
    pct,
    require_redis,
    require_wrk,
    run_wrk,
    stack,
    stamps,
)
from shared.settings import Settings
from tests.support import Proc, free_port, settings_env, wait_until

# variant: (API patches, which floor it is compared with)
API_VARIANTS = {
    "now": ("", "floor"),
    "now on asyncio + h11": ("plain-http", "floor, asyncio + h11"),
    "before (all three restored)": ("sync-deps,blocking-enqueue,plain-http", "floor, asyncio + h11"),
}
WORKER_VARIANTS = {"now (setpriv)": "", "before (preexec_fn)": "preexec-spawn"}


def patch_sync_deps() -> None:
    import api.deps as deps

    async_context, async_origin = deps.get_context, deps.same_origin_or_allowed

    def run_sync(coroutine: Any) -> Any:
        """Drive a coroutine that never suspends (both dependencies only compute) to its result."""
        try:
            coroutine.send(None)
        except StopIteration as done:
            return done.value
        raise AssertionError("the dependency suspended")

    def get_context(request: Request) -> Any:
        return run_sync(async_context(request))

    def same_origin_or_allowed(request: Request, ctx: ContextDep) -> None:
        run_sync(async_origin(request, ctx))

    object.__setattr__(get_args(deps.ContextDep)[1], "dependency", get_context)
    object.__setattr__(deps.OriginGuard, "dependency", same_origin_or_allowed)


def patch_blocking_enqueue() -> None:
    """Queue.enqueue does RQ's unique enqueue itself (sync, blocking); the replay script becomes a no-op."""
    from rq import Queue

    from api.context import AppContext

    original_enqueue, original_open = Queue.enqueue, AppContext.open.__func__  # type: ignore[attr-defined]

    def blocking(queue: Queue, *args: Any, pipeline: Any = None, **kwargs: Any) -> Any:
        return original_enqueue(queue, *args, unique=True, **kwargs)  # the recording pipeline stays empty

    async def nothing_to_replay(**_: Any) -> int:
        return 1

    def open_context(cls: type[AppContext], settings: Settings) -> AppContext:
        ctx: AppContext = original_open(cls, settings)
        ctx.enqueue_new = nothing_to_replay  # type: ignore[assignment]
        return ctx

    Queue.enqueue = blocking  # type: ignore[method-assign,assignment]
    AppContext.open = classmethod(open_context)  # type: ignore[method-assign,assignment]


def patch_plain_http() -> None:
    import uvicorn

    from bench.floor import PLAIN_HTTP

    original = uvicorn.run

    def run(*args: Any, **kwargs: Any) -> None:
        original(*args, **(kwargs | PLAIN_HTTP))

    uvicorn.run = run


def patch_preexec_spawn() -> None:
    import worker.claude as claude

    claude.spawn_options = lambda cmd, path: (cmd, {"preexec_fn": claude.die_with_parent})


PATCHES = {"sync-deps": patch_sync_deps, "blocking-enqueue": patch_blocking_enqueue,
           "plain-http": patch_plain_http, "preexec-spawn": patch_preexec_spawn}


def start(procs: Stack, settings: Settings, role: str, name: str, patches: str) -> tuple[Proc, str]:
    """A patched API (returns its base URL) or worker, started like tests/support.py starts the real ones."""
    port = free_port()
    env = settings_env(settings) | {"AGENT_PORT": str(port), "AGENT_HOST": "127.0.0.1"}
    args = [sys.executable, "-m", "bench.whatif", role, "--patch", patches or "none"]
    proc = Proc(args + (["--name", name] if role == "worker" else []), env, procs.work / f"{name}.log")
    procs.procs.append(proc)
    base = f"http://127.0.0.1:{port}"
    conn = redis.Redis.from_url(settings.redis_url)

    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"{name} exited:\n{proc.log()}")
        if role == "worker":
            return bool(conn.sismember(f"rq:workers:{settings.queue}", f"rq:worker:{name}"))
        try:
            return httpx.get(f"{base}/agent/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 30, what=name)
    return proc, base


def run(work: Path, conn: redis.Redis, rounds: int = 2, duration_s: float = 6.0, asks: int = 25) -> Section:
    require_wrk()
    flush(conn)
    cookies = admission.write_cookies(work / "cookies.txt", [f"user{n:05d}" for n in range(10_000)])
    over = admission.write_cookies(work / "cookie-over.txt", ["over"])
    fin = admission.write_cookies(work / "cookie-fin.txt", ["fin"])
    settings = bench_settings(work, **PERMISSIVE)
    limited = bench_settings(work, **(PERMISSIVE | {"rate_max": 1}))
    with stack(work) as procs:
        floors = {"floor": procs.serve("bench.floor", [], "floor", "/floor"),
                  "floor, asyncio + h11": procs.serve("bench.floor", ["--plain"], "floor-plain", "/floor")}
        apis = {v: start(procs, settings, "api", f"api-{n}", p) for n, (v, (p, _)) in enumerate(API_VARIANTS.items())}
        refusers = {v: start(procs, limited, "api", f"api-r{n}", p)
                    for n, (v, (p, _)) in enumerate(API_VARIANTS.items())}
        _, worker_base = apis["now"]
        worker, _ = start(procs, settings, "worker", "whatif-w0", "")
        job = polling.submit(worker_base, "fin", "sleep=0")
        polling.wait_status(worker_base, "fin", job, "finished")
        procs.stop(worker)  # the admitted asks below stay queued: no worker may spend CPU on them
        loads: dict[str, partial[WrkResult]] = {
            name: partial(run_wrk, url + "/floor", proc.pid, conn, connections=32, cookies=cookies)
            for name, (proc, url) in floors.items()}
        for v, (proc, base) in apis.items():
            loads[f"admitted, {v}"] = partial(run_wrk, base + "/agent/ask", proc.pid, conn, connections=32,
                                              method="POST", cookies=cookies, body="ask")
            loads[f"poll of a finished job, {v}"] = partial(run_wrk, f"{base}/agent/jobs/{job}", proc.pid, conn,
                                                            connections=32, cookies=fin)
        admission.prime_refusals(refusers["now"][1])  # one user over the limit, shared by all (one Redis)
        for v, (proc, base) in refusers.items():
            loads[f"refused, {v}"] = partial(run_wrk, base + "/agent/ask", proc.pid, conn, connections=32,
                                             method="POST", cookies=over, body="ask")
        runs: dict[str, list[WrkResult]] = {k: [] for k in loads}
        for _ in range(rounds):
            for key, load in loads.items():
                runs[key].append(load(duration_s=duration_s))
        for key, results in runs.items():  # a variant that answers wrongly would measure nothing
            wrong = sum(r.non2xx if not key.startswith("refused") else r.requests - r.non2xx for r in results)
            if wrong or sum(r.socket_errors for r in results):
                raise BenchError(f"what-if {key}: {wrong} wrong answers, {sum(r.socket_errors for r in results)} "
                                 "socket errors (see the logs in the work directory)")
        medians = {k: median_result(v) for k, v in runs.items()}
        http_rows = []
        for key, m in medians.items():
            variant = key.rsplit(", ", 1)[-1] if key not in floors else None
            floor_name = API_VARIANTS[variant][1] if variant in API_VARIANTS else key
            http_rows.append([key, floor_name, f"{m.rps:,.0f}", f"{100 * m.rps / medians[floor_name].rps:.0f}%",
                              f"{m.p50_ms:.1f}", f"{m.p99_ms:.1f}", f"{m.cpu_us_per_req:.0f}"])
        flush(conn)
        dispatch_rows = _dispatch(procs, settings, worker_base, asks)
    flush(conn)
    body = (f"Each 'before' is the real API or worker with the earlier code restored at start-up (bench/whatif.py); "
            f"each is compared with a floor served the same way. wrk -t1 -c32, {duration_s:g} s, {rounds} rounds "
            "(median), all in one run.\n\n"
            + md_table(["endpoint, variant", "against", "req/s", "of that floor", "p50 ms", "p99 ms",
                        "API CPU us/req"], http_rows)
            + f"\n\nDispatch, {asks} asks one at a time per worker variant (the API as it is now):\n\n"
            + md_table(["worker variant", "POST -> claude starts p50 ms", "p90 ms",
                        "claude exits -> client sees result p50 ms"], dispatch_rows))
    return Section("Before and after: the changes made for the missed targets, measured in one run", body,
                   data={"medians": {k: m.rps for k, m in medians.items()}})


def _dispatch(procs: Stack, settings: Settings, base: str, asks: int) -> list[list[str]]:
    rows = []
    for n, (variant, patches) in enumerate(WORKER_VARIANTS.items()):
        worker, _ = start(procs, settings, "worker", f"whatif-w{n + 1}", patches)
        with httpx.Client(timeout=30) as client:
            records = [dispatch.one_ask(client, base, f"wi{n}-{i}") for i in range(asks + dispatch.WARMUP)]
        procs.stop(worker)
        spans = dispatch.spans_of(records[dispatch.WARMUP:], stamps(settings), redis.Redis.from_url(settings.redis_url))
        first, last = spans["POST -> claude starts"], spans["claude exits -> client sees the result"]
        rows.append([variant, f"{pct(first, 50):.1f}", f"{pct(first, 90):.1f}", f"{pct(last, 50):.1f}"])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.whatif", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", nargs="?", choices=["api", "worker"], help="launch a patched process (internal)")
    parser.add_argument("--patch", default="none")
    parser.add_argument("--name")
    args = parser.parse_args()
    if args.role:
        for name in filter(None, args.patch.replace("none", "").split(",")):
            PATCHES[name]()
        from shared.cli import main as cli_main

        return cli_main([args.role, *(["--name", args.name] if args.name else [])])
    work = Path(tempfile.mkdtemp(prefix="bench-whatif-"))
    print(run(work, require_redis()).body)
    print(f"(work files in {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
