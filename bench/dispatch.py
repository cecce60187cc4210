"""Dispatch: from POST to the worker starting `claude`, and from `claude` exiting to a long-polling client
seeing the result, with an instant `claude` (bench/claude_stub.sh) and the default (forking) worker.

Asks are sent one at a time (the worker idle in between), each by its own user in a fresh session; the
client long-polls (`?wait=10`, again after each early wake) until the job is finished. Times come from
the client's clock, the stub's stamps and RQ's job hash (enqueued_at, started_at, ended_at), all wall
clock on one machine. Run alone: `python -m bench.dispatch`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import redis

from bench import worker_trace
from bench.common import (
    PERMISSIVE,
    BenchError,
    Section,
    Stack,
    Target,
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
from shared.settings import Settings
from tests.support import Proc, settings_env, wait_until

GOAL_MS = 25.0
WARMUP = 5
PAUSE_S = 0.2


def rq_ns(value: bytes | str | None) -> int:
    """An RQ timestamp (UTC, microseconds) as ns since the epoch; 0 when missing."""
    if not value:
        return 0
    text = value.decode() if isinstance(value, bytes) else value
    when = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return int(when.timestamp() * 1e6) * 1000


def one_ask(client: httpx.Client, base: str, user: str) -> dict[str, int | str]:
    """Send one ask and long-poll it to the end; client times in ns."""
    headers = {"Cookie": f"session={cookie(user)}"}
    session = str(uuid.uuid4())
    t_post = time.time_ns()
    reply = client.post(f"{base}/agent/ask", json={"session_id": session, "message": "sleep=0"}, headers=headers)
    t_accepted = time.time_ns()
    if reply.status_code != 202:
        raise BenchError(f"ask: {reply.status_code} {reply.text}")
    job_id = reply.json()["job_id"]
    wakes = 0
    while True:
        view = client.get(f"{base}/agent/jobs/{job_id}", params={"wait": 10}, headers=headers).json()
        wakes += 1
        if view["status"] in ("finished", "failed", "canceled", "expired"):
            break
    t_seen = time.time_ns()
    if view["status"] != "finished":
        raise BenchError(f"job {job_id} ended {view['status']}: {view.get('error')}")
    return {"session": session, "job_id": job_id, "post": t_post, "accepted": t_accepted, "seen": t_seen,
            "polls": wakes}


def run(work: Path, conn: redis.Redis, *, asks: int = 60, profile: bool = True) -> Section:
    flush(conn)
    settings = bench_settings(work, **PERMISSIVE)
    records: list[dict[str, int | str]] = []
    with stack(work) as procs, httpx.Client(timeout=30) as client:
        _, base = procs.api(settings, "api-dispatch")
        worker = procs.worker(settings, "bench-dispatch")
        for n in range(asks + WARMUP):
            records.append(one_ask(client, base, f"disp{n}"))
            time.sleep(PAUSE_S)
        wait_stamps(settings, [str(r["session"]) for r in records], 10)
        spans = spans_of(records[WARMUP:], settings_stamps=stamps(settings), conn=conn)
        start_ms, seen_ms = spans["POST -> claude starts"], spans["claude exits -> client sees the result"]
        missed = pct(start_ms, 50) >= GOAL_MS or pct(seen_ms, 50) >= GOAL_MS
        profile_md = ""
        if profile and missed:
            procs.stop(worker)
            profile_md = _trace_profile(work, procs, settings, client, base)
    rows = [[name, f"{pct(v, 50):.1f}", f"{pct(v, 90):.1f}", f"{pct(v, 99):.1f}", f"{max(v):.1f}"]
            for name, v in spans.items()]
    polls = [int(r["polls"]) for r in records[WARMUP:]]
    body = (f"{asks} asks one at a time ({WARMUP} warm-up asks not counted), one default worker, stub claude "
            f"answering at once; the client long-polls with `?wait=10` (median {pct(polls, 50):.0f} polls per "
            f"ask: the first wakes when the job starts).\n\n"
            + md_table(["span (ms)", "p50", "p90", "p99", "max"], rows))
    if profile_md:
        body += "\n\n" + profile_md
    targets = [Target("dispatch: POST -> claude starts, p50", pct(start_ms, 50), GOAL_MS, "ms", False),
               Target("dispatch: claude exits -> client sees result, p50", pct(seen_ms, 50), GOAL_MS, "ms", False)]
    return Section("Dispatch", body, targets, {"spans": spans})


def spans_of(records: list[dict[str, int | str]], settings_stamps: dict[str, tuple[int, int | None]],
           conn: redis.Redis) -> dict[str, list[float]]:
    spans: dict[str, list[float]] = {k: [] for k in (
        "POST -> claude starts", "claude exits -> client sees the result", "POST -> result seen (total)",
        "  POST -> 202 (API)", "  202 -> RQ started_at (dequeue, fork, prepare)",
        "  RQ started_at -> claude starts (job setup, spawn)", "  claude exits -> RQ ended_at (reap, classify)",
        "  RQ ended_at -> client sees it (save result, wake long-poll)")}
    for r in records:
        start, end = settings_stamps[str(r["session"])]
        assert end is not None
        started, ended = (rq_ns(v) for v in conn.hmget(f"rq:job:{r['job_id']}", ["started_at", "ended_at"]))
        post, accepted, seen = int(r["post"]), int(r["accepted"]), int(r["seen"])
        values = [start - post, seen - end, seen - post, accepted - post, started - accepted, start - started,
                  ended - end, seen - ended]
        for key, ns in zip(spans, values, strict=True):
            spans[key].append(ns / 1e6)
    return spans


def _trace_profile(work: Path, procs: Stack, settings: Settings, client: httpx.Client, base: str,
                   asks: int = 30) -> str:
    """The same asks through a traced worker (bench/worker_trace.py): when each step starts and how long it takes."""
    trace = work / "worker-trace.txt"
    name = f"bench-traced-{os.getpid()}"
    proc = Proc([sys.executable, "-m", "bench.worker_trace", "--name", name],
                settings_env(settings) | {"BENCH_TRACE_FILE": str(trace)}, work / "worker-traced.log")
    procs.procs.append(proc)
    conn = redis.Redis.from_url(settings.redis_url)
    wait_until(lambda: conn.sismember(f"rq:workers:{settings.queue}", f"rq:worker:{name}"), 20, what="traced worker")
    records = []
    for n in range(asks + WARMUP):
        records.append(one_ask(client, base, f"trace{n}"))
        time.sleep(PAUSE_S)
    records = records[WARMUP:]
    wait_stamps(settings, [str(r["session"]) for r in records], 10)
    table = _timeline(worker_trace.read(trace), records, stamps(settings), proc.pid)
    return (f"**Where the time goes** ({asks} asks through a worker with wall-clock stamps around each step, "
            f"bench/worker_trace.py; nested steps overlap their callers; p50 over the asks):\n\n{table}")


def _timeline(events: list[tuple[str, int, str, int]], records: list[dict[str, int | str]],
              marks: dict[str, tuple[int, int | None]], worker_pid: int) -> str:
    calls: list[tuple[str, int, int]] = []  # (who: step, begin ns, end ns)
    open_calls: dict[tuple[int, str], list[int]] = {}
    for kind, pid, fn, ns in events:
        if kind == "E":
            open_calls.setdefault((pid, fn), []).append(ns)
        elif open_calls.get((pid, fn)):
            calls.append((f"{'worker' if pid == worker_pid else 'horse'}: `{fn}`", open_calls[(pid, fn)].pop(), ns))
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for i, r in enumerate(records):  # asks are sequential: each owns the calls ending before the next POST
        post = int(r["post"])
        until = int(records[i + 1]["post"]) if i + 1 < len(records) else post + 10**9
        start, end = marks[str(r["session"])]
        spans = [("API: POST -> 202", post, int(r["accepted"])),
                 ("claude stub (sh, date, printf)", start, end or start),
                 ("client sees the result", int(r["seen"]), int(r["seen"]))]
        seen: set[str] = set()
        for who, begin, finish in calls:
            if post <= finish < until and who not in seen:
                seen.add(who)
                spans.append((who, begin, finish))
        for who, begin, finish in spans:
            rows.setdefault(who, []).append(((begin - post) / 1e6, (finish - post) / 1e6, (finish - begin) / 1e6))
    ordered = sorted(rows.items(), key=lambda kv: pct([e for _, e, _ in kv[1]], 50))
    table = []
    for who, vals in ordered:
        begin_ms = pct([b for b, _, _ in vals], 50)
        table.append([who, f"{begin_ms:.1f}" if begin_ms >= 0 else "(waiting before)",
                      f"{pct([e for _, e, _ in vals], 50):.1f}", f"{pct([d for _, _, d in vals], 50):.1f}"])
    return md_table(["step (first call per ask)", "starts, ms after POST", "ends, ms after POST", "takes ms"], table)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dispatch", description=__doc__)
    parser.add_argument("--asks", type=int, default=60)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dispatch-"))
    section = run(work, require_redis(), asks=args.asks, profile=not args.no_profile)
    print(section.body)
    print(md_table(["target", "measured", "goal", ""], [t.row() for t in section.targets]))
    print(f"(work files in {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
