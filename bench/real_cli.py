"""The real CLI end to end: one ask through the API, a worker and the pinned `claude` (scripts/install-claude)
against the offline Messages API stand-in (devtools.standin.MessagesStandin), and the queue's share of it.

The worker runs bench/claude_stub.sh with BENCH_REAL_CLAUDE set, so the stub stamps the start and the end
of the real CLI around it (the stamps add a sh and two `date` runs, about 3 ms). The queue's share is
(POST -> claude starts) + (claude exits -> client sees the result) over POST -> result seen.
Run alone: `python -m bench.real_cli`.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import httpx
import redis

from bench.common import (
    PERMISSIVE,
    ROOT,
    Section,
    bench_settings,
    cookie,
    flush,
    md_table,
    pct,
    require_redis,
    stack,
    stamps,
    wait_stamps,
)
from bench.dispatch import one_ask
from shared.settings import DEFAULT_ENV_PASSTHROUGH

ASKS = 8


def install_claude() -> tuple[str | None, str]:
    """(path of the pinned CLI, "") or (None, why it is not there)."""
    script = ROOT / "scripts" / "install-claude"
    if not script.exists():
        return None, "scripts/install-claude is missing"
    try:
        done = subprocess.run([str(script)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return None, "scripts/install-claude took more than 15 minutes"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not Path(lines[-1]).exists():
        return None, f"scripts/install-claude failed ({done.returncode}): {done.stderr.strip()[-300:]}"
    return lines[-1], ""


def run(work: Path, conn: redis.Redis, asks: int = ASKS) -> Section:
    title = "The real CLI against the offline stand-in"
    binary, why = install_claude()
    try:
        from devtools.standin import MessagesStandin
    except ImportError as exc:
        binary, why = None, f"devtools.standin is not importable ({exc})"
    if binary is None:
        return Section(title, f"Not run: {why}.")
    flush(conn)
    settings = bench_settings(work, claude_config_dir=work / "claude-real", **PERMISSIVE,
                              claude_env_passthrough=[*DEFAULT_ENV_PASSTHROUGH, "BENCH_REAL_CLAUDE"])
    env = {"BENCH_REAL_CLAUDE": binary, "ANTHROPIC_API_KEY": "bench-offline-key"}
    with MessagesStandin(mode="text") as standin, stack(work) as procs, httpx.Client(timeout=60) as client:
        _, base = procs.api(settings, "api-real")
        procs.worker(settings, "bench-real", env | {"ANTHROPIC_BASE_URL": standin.url})
        records = [one_ask(client, base, f"real{n}") for n in range(asks + 1)][1:]  # the first one warms the cache
        wait_stamps(settings, [str(r["session"]) for r in records], 30)
        marks = stamps(settings)
        reply = client.get(f"{base}/agent/jobs/{records[-1]['job_id']}",
                           headers={"Cookie": f"session={cookie(f'real{asks}')}"}).json()
        requests_seen = len(standin.message_requests)
    flush(conn)
    spans: dict[str, list[float]] = {k: [] for k in (
        "POST -> result seen (total)", "claude runs (start -> exit)", "POST -> claude starts (queue)",
        "claude exits -> result seen (queue)")}
    shares = []
    for r in records:
        start, end = marks[str(r["session"])]
        assert end is not None
        post, seen = int(r["post"]), int(r["seen"])
        values = [seen - post, end - start, start - post, seen - end]
        for key, ns in zip(spans, values, strict=True):
            spans[key].append(ns / 1e6)
        shares.append(100 * (start - post + seen - end) / (seen - post))
    rows = [[k, f"{pct(v, 50):.0f}", f"{min(v):.0f}", f"{max(v):.0f}"] for k, v in spans.items()]
    rows.append(["**queue's share of the total**", f"**{pct(shares, 50):.1f}%**", f"{min(shares):.1f}%",
                 f"{max(shares):.1f}%"])
    text = str((reply.get("result") or {}).get("result", ""))[:80]
    body = (f"claude {binary.split('/claude-cli/')[-1].split('/')[0]} (pinned), {asks} asks one at a time (after one "
            f"warm-up), each a new session, one default worker, stream-json progress on; the stand-in answered "
            f"{requests_seen} Messages requests; last reply: \"{text}\".\n\n"
            + md_table(["span (ms)", "p50", "min", "max"], rows))
    return Section(title, body, data={"spans": spans, "shares": shares})


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.real_cli", description=__doc__)
    parser.add_argument("--asks", type=int, default=ASKS)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-real-"))
    print(run(work, require_redis(), args.asks).body)
    print(f"(work files in {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
