"""Polling: `GET /agent/jobs/{id}` on a queued, a running and a finished job vs the floor.

One API and one worker: a finished ask, then a long one that keeps the worker busy (running), then one
waiting behind it (queued); each is polled by its owner (signed cookie). wrk rounds alternate floor /
queued / running / finished; each figure is the median over the rounds. Run alone: `python -m bench.polling`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path

import httpx
import redis

from bench import profiling
from bench.common import (
    PERMISSIVE,
    BenchError,
    Section,
    Target,
    WrkResult,
    bench_settings,
    cookie,
    flush,
    md_table,
    median_result,
    require_redis,
    require_wrk,
    run_wrk,
    stack,
)

GOAL = 70.0
STATES = ("queued", "started", "finished")


def submit(base: str, user: str, message: str) -> str:
    headers = {"Cookie": f"session={cookie(user)}"}
    reply = httpx.post(f"{base}/agent/ask", json={"session_id": str(uuid.uuid4()), "message": message},
                       headers=headers, timeout=5)
    if reply.status_code != 202:
        raise BenchError(f"ask by {user}: {reply.status_code} {reply.text}")
    return str(reply.json()["job_id"])


def wait_status(base: str, user: str, job_id: str, status: str, timeout_s: float = 30.0) -> None:
    headers = {"Cookie": f"session={cookie(user)}"}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = httpx.get(f"{base}/agent/jobs/{job_id}?wait=1", headers=headers, timeout=5).json()
        if view.get("status") == status:
            return
        time.sleep(0.05)
    raise BenchError(f"job {job_id} did not reach {status!r} in {timeout_s} s")


def run(work: Path, conn: redis.Redis, *, rounds: int = 3, duration_s: float = 8.0, connections: int = 32,
        profile: bool = True) -> Section:
    require_wrk()
    flush(conn)
    settings = bench_settings(work, **PERMISSIVE)
    with stack(work) as procs:
        floor_proc, floor_url = procs.serve("bench.floor", [], "floor", "/floor")
        api_proc, base = procs.api(settings, "api-poll")
        procs.worker(settings, "bench-poll")
        owners = {"finished": "poll-fin", "started": "poll-run", "queued": "poll-que"}
        jobs = {"finished": submit(base, owners["finished"], "sleep=0")}
        wait_status(base, owners["finished"], jobs["finished"], "finished")
        jobs["started"] = submit(base, owners["started"], "sleep=900")
        wait_status(base, owners["started"], jobs["started"], "started")
        jobs["queued"] = submit(base, owners["queued"], "sleep=0")
        cookie_files = {}
        for state, user in owners.items():
            cookie_files[state] = work / f"cookie-{user}.txt"
            cookie_files[state].write_text(cookie(user) + "\n")

        def floor_run(d: float) -> WrkResult:
            return run_wrk(floor_url + "/floor", floor_proc.pid, conn, duration_s=d, connections=connections,
                           cookies=cookie_files["queued"])

        def poll_run(state: str, d: float) -> WrkResult:
            return run_wrk(f"{base}/agent/jobs/{jobs[state]}", api_proc.pid, conn, duration_s=d,
                           connections=connections, cookies=cookie_files[state])

        floor_run(2.0)
        for state in STATES:
            poll_run(state, 2.0)
        floors: list[WrkResult] = []
        polls: dict[str, list[WrkResult]] = {s: [] for s in STATES}
        for _ in range(rounds):
            floors.append(floor_run(duration_s))
            for state in STATES:
                polls[state].append(poll_run(state, duration_s))
        still = {s: httpx.get(f"{base}/agent/jobs/{jobs[s]}", headers={"Cookie": f"session={cookie(owners[s])}"},
                              timeout=5).json()["status"] for s in STATES}
        if still != {s: s for s in STATES}:
            raise BenchError(f"the jobs changed state during the benchmark: {still}")
        floor = median_result(floors)
        medians = {s: median_result(polls[s]) for s in STATES}
        ratios = {s: 100 * medians[s].rps / floor.rps for s in STATES}
        missed = [s for s in STATES if ratios[s] < GOAL]
        plan: list[tuple[int, str, profiling.Load]] = [(floor_proc.pid, "floor", floor_run)]
        plan += [(api_proc.pid, f"poll of a {s} job", partial(poll_run, s)) for s in missed]
        profiles = profiling.profile_loads(work, plan) if profile and missed else ""
        httpx.delete(f"{base}/agent/jobs/{jobs['started']}", headers={"Cookie": f"session={cookie(owners['started'])}",
                                                                      "Origin": base}, timeout=15)
    rows = [["floor: FastAPI + one async Redis GET", f"{floor.rps:,.0f}", "100%", f"{floor.p50_ms:.2f}",
             f"{floor.p99_ms:.2f}", f"{floor.cpu_us_per_req:.0f}", f"{floor.redis_reads_per_req:.2f}"]]
    for s in STATES:
        m = medians[s]
        if m.non2xx or m.socket_errors:
            raise BenchError(f"polls of the {s} job: {m.non2xx} non-2xx answers, {m.socket_errors} socket errors")
        rows.append([f"`GET /agent/jobs/{{id}}`, {s} job", f"{m.rps:,.0f}", f"{ratios[s]:.0f}%", f"{m.p50_ms:.2f}",
                     f"{m.p99_ms:.2f}", f"{m.cpu_us_per_req:.0f}", f"{m.redis_reads_per_req:.2f}"])
    table = md_table(["endpoint", "req/s", "of floor", "p50 ms", "p99 ms", "API CPU us/req", "Redis reads/req"], rows)
    body = (f"wrk -t1 -c{connections}, {duration_s:g} s per run, {rounds} alternating rounds (median); signed "
            f"cookie of the job's owner; every answer 200 with the expected status.\n\n{table}")
    if profiles:
        body += "\n\n" + profiles
    targets = [Target(f"polling: {s} job req/s vs floor", ratios[s], GOAL, "%") for s in STATES]
    return Section("Polling", body, targets, {"floor": floor, **medians})


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.polling", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-polling-"))
    section = run(work, require_redis(), rounds=args.rounds, duration_s=args.duration, profile=not args.no_profile)
    print(section.body)
    print(md_table(["target", "measured", "goal", ""], [t.row() for t in section.targets]))
    print(f"(work files in {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
