"""The old design as the baseline: `claude` inside the request (bench/oldservice.py) vs the queue, under
the same closed-loop load: 50 clients, each its own user, each with one ask in flight at a time, asking
again as soon as it has its answer, for a fixed window; every HTTP request gives up after 5 s.

Old design: the answer is the response to the POST. New design: POST (202), then long-polls
(`?wait=4`, each under the same 5 s timeout) until the job ends. The stub claude sleeps 2 s (shorter
than the client's timeout) or 6 s (longer). Run alone: `python -m bench.baseline`.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from bench.common import (
    PERMISSIVE,
    STUB,
    Section,
    bench_settings,
    cookie,
    flush,
    md_table,
    pct,
    require_redis,
    stack,
    stamps,
)
from shared.settings import Settings
from tests.support import wait_until

CLIENTS = 50
WINDOW_S = 20.0
TIMEOUT_S = 5.0
WORKERS = 2
SCENARIOS = (2.0, 6.0)  # stub claude sleep, seconds
RETRY_S = 1.0  # a refused client waits this long before asking again


@dataclass
class Ask:
    session: str
    answer_s: float  # until the HTTP answer to the ask (the whole run in the old design; 202 in the new)
    timed_out: bool
    result_s: float | None  # until the client had the result, if it got it
    refused: bool = False  # 429: the user's previous ask still holds the semaphore / lease


async def old_client(client: httpx.AsyncClient, base: str, user: str, sleep_s: float, deadline: float,
                     out: list[Ask]) -> None:
    headers = {"Cookie": f"session={cookie(user)}"}
    while time.monotonic() < deadline:
        session, t0 = str(uuid.uuid4()), time.monotonic()
        try:
            reply = await client.post(f"{base}/agent/ask", json={"session_id": session, "message": f"sleep={sleep_s}"},
                                      headers=headers)
        except httpx.TimeoutException:
            out.append(Ask(session, time.monotonic() - t0, True, None))
            continue
        took = time.monotonic() - t0
        out.append(Ask(session, took, False, took if reply.status_code == 200 else None, reply.status_code == 429))
        if reply.status_code != 200:
            await asyncio.sleep(RETRY_S)


async def new_client(client: httpx.AsyncClient, base: str, user: str, sleep_s: float, deadline: float,
                     end: float, out: list[Ask]) -> None:
    headers = {"Cookie": f"session={cookie(user)}", "Origin": base}
    while time.monotonic() < deadline:
        session, t0 = str(uuid.uuid4()), time.monotonic()
        ask = Ask(session, 0.0, False, None)
        out.append(ask)
        try:
            reply = await client.post(f"{base}/agent/ask", json={"session_id": session, "message": f"sleep={sleep_s}"},
                                      headers=headers)
            ask.answer_s = time.monotonic() - t0
            if reply.status_code != 202:
                ask.refused = reply.status_code == 429
                await asyncio.sleep(RETRY_S)
                continue
            job_id = reply.json()["job_id"]
            while time.monotonic() < end:
                view = (await client.get(f"{base}/agent/jobs/{job_id}", params={"wait": 4}, headers=headers)).json()
                if view["status"] in ("finished", "failed", "canceled", "expired"):
                    ask.result_s = time.monotonic() - t0 if view["status"] == "finished" else None
                    break
        except httpx.TimeoutException:
            ask.timed_out = True
            ask.answer_s = ask.answer_s or time.monotonic() - t0
        if ask.result_s is None:
            return  # the window ended while it waited


async def drive(base: str, design: str, sleep_s: float) -> list[Ask]:
    out: list[Ask] = []
    start = time.monotonic()
    deadline, end = start + WINDOW_S, start + WINDOW_S + TIMEOUT_S + 1
    limits = httpx.Limits(max_connections=CLIENTS * 2, max_keepalive_connections=CLIENTS * 2)
    async with httpx.AsyncClient(timeout=TIMEOUT_S, limits=limits) as client:
        if design == "old":
            tasks = [old_client(client, base, f"base{n}", sleep_s, deadline, out) for n in range(CLIENTS)]
        else:
            tasks = [new_client(client, base, f"base{n}", sleep_s, deadline, end, out) for n in range(CLIENTS)]
        await asyncio.gather(*tasks)
    return out


def peak_concurrency(marks: dict[str, tuple[int, int | None]]) -> int:
    edges = sorted([(s, 1) for s, _ in marks.values()] + [(e or time.time_ns(), -1) for _, e in marks.values()])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def row(design: str, sleep_s: float, asks: list[Ask], marks: dict[str, tuple[int, int | None]]) -> list[str]:
    n = len(asks) or 1
    answers_ms = [a.answer_s * 1000 for a in asks]
    held = sum(1 for a in asks if a.timed_out or a.answer_s >= sleep_s)
    timed_out = sum(1 for a in asks if a.timed_out)
    refused = sum(1 for a in asks if a.refused)
    results = [a.result_s for a in asks if a.result_s is not None]
    if design == "old":
        lost_sessions = {a.session for a in asks if a.timed_out}
        lost = str(sum(1 for s, (_, e) in marks.items() if s in lost_sessions and e is not None))
    else:
        lost = "0 (results kept 1 h)"
    answer = f"{pct(answers_ms, 50):,.0f} / {pct(answers_ms, 99):,.0f}"
    return [f"{design}, claude {sleep_s:g} s", str(len(asks)), answer,
            f"{100 * held / n:.0f}%", f"{100 * timed_out / n:.0f}%", str(refused),
            f"{len(results)} ({100 * len(results) / n:.0f}%)",
            f"{pct(results, 50):.1f}" if results else "-", str(len(marks)), str(peak_concurrency(marks)), lost]


def run_old(work: Path, sleep_s: float) -> tuple[list[Ask], dict[str, tuple[int, int | None]]]:
    config = work / f"old-{sleep_s:g}"
    (config / "bench-stamps").mkdir(parents=True)
    with stack(work) as procs:
        _, base = procs.serve("bench.oldservice", ["--claude-bin", str(STUB), "--config-dir", str(config)],
                              f"old-{sleep_s:g}", "/agent/health")
        asks = asyncio.run(drive(base, "old", sleep_s))
        settings = bench_settings(work, claude_config_dir=config)
        wait_until(lambda: all(e is not None for _, e in stamps(settings).values()), 30, 0.2, what="old runs to end")
    return asks, stamps(settings)


def run_new(work: Path, conn: redis.Redis, sleep_s: float) -> tuple[list[Ask], dict[str, tuple[int, int | None]]]:
    flush(conn)
    settings: Settings = bench_settings(work, claude_config_dir=work / f"new-{sleep_s:g}", **PERMISSIVE)
    with stack(work) as procs:
        _, base = procs.api(settings, f"api-new-{sleep_s:g}")
        for n in range(WORKERS):
            procs.worker(settings, f"bench-base{n}")
        asks = asyncio.run(drive(base, "new", sleep_s))
        marks = stamps(settings)
    flush(conn)
    return asks, marks


def run(work: Path, conn: redis.Redis) -> Section:
    rows = []
    for sleep_s in SCENARIOS:
        rows.append(row("old", sleep_s, *run_old(work, sleep_s)))
        rows.append(row("new", sleep_s, *run_new(work, conn, sleep_s)))
    headers = ["design, stub claude", "asks", "answer to the ask p50 / p99 ms", "held open for the whole run",
               "timed out (5 s)", "refused (429)", "results received", "result p50 s", "claude runs",
               "peak concurrent claude", "runs whose answer was lost"]
    body = (f"{CLIENTS} closed-loop clients (one user each) for {WINDOW_S:g} s, every HTTP request with a "
            f"{TIMEOUT_S:g} s client timeout; new design with {WORKERS} workers (this machine's vCPUs). "
            "'Held open' = the HTTP answer to the ask took the whole claude run or timed out.\n\n"
            + md_table(headers, rows))
    return Section("The old in-request design as the baseline", body)


def main() -> int:
    argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__).parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
    section = run(work, require_redis())
    print(section.body)
    print(f"(work files in {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
