"""Admission: `POST /agent/ask` admitted (many users) and refused (one user over the limit) vs the floor.

Two API processes on one Redis: one admits everything (10k users with their own signed cookies, a fresh
session per ask, rate and concurrency caps out of reach, no worker so every ask stays queued), one has
`rate_max=1` and is hit by a user who already used that one ask (every request: 429 with Retry-After).
wrk rounds alternate floor / admitted / refused; each figure is the median over the rounds.
Run alone: `python -m bench.admission`.
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from pathlib import Path

import httpx
import redis

from bench import profiling
from bench.common import (
    PERMISSIVE,
    QUEUE,
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

ADMITTED_GOAL = 50.0
REFUSED_GOAL = 80.0


def write_cookies(path: Path, users: list[str]) -> Path:
    path.write_text("".join(cookie(u) + "\n" for u in users))
    return path


def ask_once(base: str, user: str) -> httpx.Response:
    body = {"session_id": str(uuid.uuid4()), "message": "hello"}
    return httpx.post(f"{base}/agent/ask", json=body, headers={"Cookie": f"session={cookie(user)}"}, timeout=5)


def prime_refusals(base: str) -> None:
    """User `over` spends its one ask; the next one must be refused, or the benchmark measures nothing."""
    first, second = ask_once(base, "over"), ask_once(base, "over")
    if first.status_code != 202 or second.status_code != 429:
        raise BenchError(f"refusal setup: expected 202 then 429, got {first.status_code} then {second.status_code}")


def result_row(name: str, r: WrkResult, floor: WrkResult, answers: str) -> list[str]:
    return [name, f"{r.rps:,.0f}", f"{100 * r.rps / floor.rps:.0f}%", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
            f"{r.cpu_us_per_req:.0f}", f"{r.redis_reads_per_req:.2f}", answers]


def run(work: Path, conn: redis.Redis, *, rounds: int = 3, duration_s: float = 8.0, connections: int = 32,
        users: int = 10_000, profile: bool = True) -> Section:
    require_wrk()
    flush(conn)
    cookies = write_cookies(work / "cookies.txt", [f"user{n:05d}" for n in range(users)])
    over = write_cookies(work / "cookie-over.txt", ["over"])
    with stack(work) as procs:
        floor_proc, floor_url = procs.serve("bench.floor", [], "floor", "/floor")
        admit_proc, admit_url = procs.api(bench_settings(work, **PERMISSIVE), "api-admit")
        limit_proc, limit_url = procs.api(bench_settings(work, **(PERMISSIVE | {"rate_max": 1})), "api-refuse")
        if ask_once(admit_url, "user00000").status_code != 202:
            raise BenchError("the admitting API did not answer 202")
        prime_refusals(limit_url)

        def floor_run(d: float = duration_s) -> WrkResult:
            return run_wrk(floor_url + "/floor", floor_proc.pid, conn, duration_s=d, connections=connections,
                           cookies=cookies)

        def admit_run(d: float = duration_s) -> WrkResult:
            return run_wrk(admit_url + "/agent/ask", admit_proc.pid, conn, duration_s=d, connections=connections,
                           method="POST", cookies=cookies, body="ask")

        def refuse_run(d: float = duration_s) -> WrkResult:
            return run_wrk(limit_url + "/agent/ask", limit_proc.pid, conn, duration_s=d, connections=connections,
                           method="POST", cookies=over, body="ask")

        for warm in (floor_run, admit_run, refuse_run):
            warm(2.0)
        floors: list[WrkResult] = []
        admitted: list[WrkResult] = []
        refused: list[WrkResult] = []
        queued = 0
        for _ in range(rounds):
            flush(conn)
            floors.append(floor_run())
            admitted.append(admit_run())
            queued += int(conn.llen(f"rq:queue:{QUEUE}"))
            flush(conn)
            prime_refusals(limit_url)
            refused.append(refuse_run())
        floor, adm, ref = median_result(floors), median_result(admitted), median_result(refused)
        if adm.non2xx or adm.socket_errors or ref.non2xx != ref.requests:
            raise BenchError(f"unexpected answers: admitted {adm}, refused {ref}")
        missed = adm.rps / floor.rps * 100 < ADMITTED_GOAL or ref.rps / floor.rps * 100 < REFUSED_GOAL
        plan: list[tuple[int, str, profiling.Load]] = [
            (floor_proc.pid, "floor", floor_run), (admit_proc.pid, "admitted ask", admit_run),
            (limit_proc.pid, "refused ask", refuse_run)]
        profiles = profiling.profile_loads(work, plan) if profile and missed else ""
    adm_pct, ref_pct = 100 * adm.rps / floor.rps, 100 * ref.rps / floor.rps
    rows = [
        result_row("floor: FastAPI + one async Redis GET", floor, floor, f"{floor.requests:,} x 200"),
        result_row(f"`POST /agent/ask` admitted ({users:,} users)", adm, floor,
                   f"{adm.requests:,} x 202 ({queued:,} jobs queued)"),
        result_row("`POST /agent/ask` refused (one user over the limit)", ref, floor, f"{ref.requests:,} x 429"),
    ]
    table = md_table(["endpoint", "req/s", "of floor", "p50 ms", "p99 ms", "API CPU us/req", "Redis reads/req",
                      "answers (all rounds)"], rows)
    body = (f"wrk -t1 -c{connections}, {duration_s:g} s per run, {rounds} alternating rounds (median); signed "
            f"cookies; one uvicorn process each.\n\n{table}")
    targets = [Target("admission: admitted req/s vs floor", adm_pct, ADMITTED_GOAL, "%"),
               Target("admission: refused req/s vs floor", ref_pct, REFUSED_GOAL, "%")]
    if profiles:
        body += "\n\n" + profiles
    return Section("Admission", body, targets, {"floor": floor, "admitted": adm, "refused": ref})


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.admission", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    conn = require_redis()
    work = Path(tempfile.mkdtemp(prefix="bench-admission-"))
    section = run(work, conn, rounds=args.rounds, duration_s=args.duration, profile=not args.no_profile)
    print(f"(work files in {work})")
    print(section.body)
    print(md_table(["target", "measured", "goal", ""], [t.row() for t in section.targets]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
