"""Scaling: jobs/s with 1, 2, 4, 8 forking workers and a stub claude that sleeps 1 s; worker memory (PSS).

For each worker count W, W x 8 asks (distinct users) are submitted at once through the API and the
time from the first POST to the last stub exit is the makespan. Memory is read from
/proc/<pid>/smaps_rollup: a fresh idle worker, an idle worker after jobs, and a worker running a job
(the parent plus its work-horse; the claude stub is listed apart). Run alone: `python -m bench.scaling`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path

import httpx
import redis

from bench import profiling
from bench.common import (
    BENCH_DIR,
    PERMISSIVE,
    STUB,
    BenchError,
    Section,
    Target,
    bench_settings,
    children,
    cookie,
    cpu_s,
    flush,
    md_table,
    pss_kib,
    require_redis,
    stack,
    stamps,
    wait_stamps,
)
from shared.settings import Settings
from tests.support import wait_until

WORKER_COUNTS = (1, 2, 4, 8)
JOBS_PER_WORKER = 8
SLEEP_S = 1.0
GOAL = 90.0
PLOT = BENCH_DIR / "scaling.svg"


async def submit_all(base: str, users: list[str], message: str) -> list[tuple[str, int]]:
    """(session id, POST time ns) per ask, all sent at once."""

    async def one(client: httpx.AsyncClient, user: str) -> tuple[str, int]:
        session, t_post = str(uuid.uuid4()), time.time_ns()
        reply = await client.post(f"{base}/agent/ask", json={"session_id": session, "message": message},
                                  headers={"Cookie": f"session={cookie(user)}"})
        if reply.status_code != 202:
            raise BenchError(f"ask by {user}: {reply.status_code} {reply.text}")
        return session, t_post

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as client:
        return list(await asyncio.gather(*(one(client, u) for u in users)))


def no_children(pids: list[int]) -> bool:
    return not any(children(pid) for pid in pids)


def memory_rows(base: str, worker_pid: int, settings: Settings, idle_fresh_kib: int) -> list[list[str]]:
    """PSS of the idle worker (after jobs) and of the worker running a job, in MiB."""
    wait_until(lambda: not children(worker_pid), 10, 0.05, what="the work-horse to exit")
    time.sleep(0.5)
    idle_kib = pss_kib(worker_pid)
    [(session, _)] = asyncio.run(submit_all(base, ["mem0"], "sleep=5"))
    wait_stamps(settings, [session], 10, ended=False)
    [horse] = children(worker_pid)
    stub = children(horse)
    parent_kib, horse_kib = pss_kib(worker_pid), pss_kib(horse)
    stub_kib = sum(pss_kib(p) for p in stub)
    mib = 1024.0
    return [["idle worker, fresh (before any job)", f"{idle_fresh_kib / mib:.1f}"],
            ["idle worker, after jobs", f"{idle_kib / mib:.1f}"],
            ["running a job: worker parent", f"{parent_kib / mib:.1f}"],
            ["running a job: work-horse", f"{horse_kib / mib:.1f}"],
            ["**running a job: parent + horse**", f"**{(parent_kib + horse_kib) / mib:.1f}**"],
            ["(the claude stub itself, sh: not counted)", f"{stub_kib / mib:.1f}"]]


def run(work: Path, conn: redis.Redis, profile: bool = True) -> Section:
    results: list[tuple[int, int, float, float]] = []  # (workers, jobs, makespan s, worker CPU ms per job)
    memory: list[list[str]] = []
    for workers in WORKER_COUNTS:
        flush(conn)
        config = work / f"scale-{workers}"
        settings = bench_settings(work, claude_config_dir=config, **PERMISSIVE)
        with stack(work) as procs:
            _, base = procs.api(settings, f"api-scale-{workers}")
            started = [procs.worker(settings, f"bench-scale{workers}-{n}") for n in range(workers)]
            idle_fresh = pss_kib(started[0].pid)
            jobs = workers * JOBS_PER_WORKER
            cpu0 = sum(cpu_s(w.pid, reaped_children=True) for w in started)
            sent = asyncio.run(submit_all(base, [f"scale{workers}-{n}" for n in range(jobs)], f"sleep={SLEEP_S:g}"))
            wait_stamps(settings, [s for s, _ in sent], JOBS_PER_WORKER * SLEEP_S * 4 + 30)
            marks = stamps(settings)
            last_end = max(int(marks[s][1] or 0) for s, _ in sent)
            wait_until(partial(no_children, [w.pid for w in started]), 10, 0.05, what="work-horses to exit")
            cpu_ms = (sum(cpu_s(w.pid, reaped_children=True) for w in started) - cpu0) * 1000 / jobs
            results.append((workers, jobs, (last_end - min(t for _, t in sent)) / 1e9, cpu_ms))
            if workers == 1:
                memory = memory_rows(base, started[0].pid, settings, idle_fresh)
    flush(conn)
    rate_1 = results[0][1] / results[0][2]
    rows, efficiencies = [], []
    for workers, jobs, makespan, cpu_ms in results:
        rate = jobs / makespan
        vs_linear = 100 * rate / (workers * rate_1)
        efficiencies.append(vs_linear)
        rows.append([str(workers), str(jobs), f"{makespan:.2f}", f"{rate:.2f}", f"{100 * rate / workers:.0f}%",
                     f"{vs_linear:.0f}%", f"{cpu_ms:.0f}"])
    write_plot([(w, j / m) for w, j, m, _ in results])
    body = (f"Stub claude sleeping {SLEEP_S:g} s; {JOBS_PER_WORKER} jobs per worker submitted at once; makespan = "
            "first POST to last stub exit.\n\n"
            + md_table(["workers", "jobs", "makespan s", "jobs/s", "of ideal (1 job/s per worker)",
                        "of linear (W x 1-worker rate)", "worker CPU ms/job"], rows)
            + f"\n\nWorker CPU per job = worker + work-horse + stub (sh, 2 x date, sleep), from /proc; the stub alone "
            f"takes {stub_cpu_ms(work):.1f} ms."
            + f"\n\n![jobs/s against workers]({PLOT.name})\n\nMemory (PSS, MiB):\n\n"
            + md_table(["process", "PSS MiB"], memory))
    targets = [Target("scaling: worst of 2/4/8 workers vs linear", min(efficiencies[1:]), GOAL, "%")]
    if profile and not targets[0].met:
        body += "\n\n" + profile_workers(work, conn)
    return Section("Scaling", body, targets, {"results": results})


def profile_workers(work: Path, conn: redis.Redis, workers: int = 2, jobs_each: int = 12) -> str:
    """py-spy over one worker and its work-horses while `workers` workers run 1 s jobs back to back."""
    flush(conn)
    settings = bench_settings(work, claude_config_dir=work / "scale-profile", **PERMISSIVE)
    out = work / "profile-worker.txt"
    with stack(work) as procs:
        _, base = procs.api(settings, "api-scale-profile")
        started = [procs.worker(settings, f"bench-prof{n}") for n in range(workers)]
        users = [f"prof-{n}" for n in range(workers * jobs_each)]

        def load() -> None:
            sent = asyncio.run(submit_all(base, users, f"sleep={SLEEP_S:g}"))
            wait_stamps(settings, [s for s, _ in sent], jobs_each * SLEEP_S * 4 + 30)

        profiling.record(started[0].pid, out, jobs_each * SLEEP_S * 1.3 + 2, load, subprocesses=True, rate_hz=500)
        name = f"rq:worker:bench-prof0-{os.getpid()}"
        done = int(conn.hget(name, "successful_job_count") or 0)
    flush(conn)
    return profiling.summary(out, done, 0.0, f"one of {workers} workers and its work-horses (py-spy --subprocesses)",
                             profiling.WORKER, rate_hz=500)


def stub_cpu_ms(work: Path, runs: int = 20) -> float:
    """CPU of one stub run that answers at once (sh, date twice, printf), from RUSAGE_CHILDREN."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(runs):
        subprocess.run([str(STUB), "-p", "--session-id", "cpu-probe", "--", "hi"], env={"CLAUDE_CONFIG_DIR": str(work)},
                       stdout=subprocess.DEVNULL, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000 / runs


def write_plot(points: list[tuple[int, float]]) -> None:
    """A hand-written SVG line chart: measured jobs/s and the ideal (1 job/s per worker)."""
    width, height, pad = 480, 300, 50
    x_max, y_max = max(w for w, _ in points), max(max(w for w, _ in points), max(r for _, r in points))

    def xy(w: float, r: float) -> str:
        return f"{pad + (width - 2 * pad) * w / x_max:.1f},{height - pad - (height - 2 * pad) * r / y_max:.1f}"

    ideal = " ".join(xy(w, w) for w, _ in points)
    measured = " ".join(xy(w, r) for w, r in points)
    ticks = "".join(
        f'<text x="{xy(w, 0).split(",")[0]}" y="{height - pad + 18}" text-anchor="middle">{w}</text>'
        f'<text x="{pad - 8}" y="{float(xy(0, w).split(",")[1]) + 4:.1f}" text-anchor="end">{w}</text>'
        for w, _ in points)
    dots = "".join(f'<circle cx="{xy(w, r).split(",")[0]}" cy="{xy(w, r).split(",")[1]}" r="4" fill="#1f77b4">'
                   f"<title>{w} workers: {r:.2f} jobs/s</title></circle>" for w, r in points)
    PLOT.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>\n{ticks}\n'
        f'<polyline points="{ideal}" fill="none" stroke="#999" stroke-dasharray="5,4"/>\n'
        f'<polyline points="{measured}" fill="none" stroke="#1f77b4" stroke-width="2"/>\n{dots}\n'
        f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">workers</text>'
        f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">jobs/s</text>'
        f'<text x="{pad + 10}" y="{pad - 20}">jobs/s with a 1 s claude stub (dashed: ideal, 1 job/s per worker)'
        "</text>\n</svg>\n")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    section = run(work, require_redis(), profile=not args.no_profile)
    print(section.body)
    print(md_table(["target", "measured", "goal", ""], [t.row() for t in section.targets]))
    print(f"(work files in {work}; plot in {PLOT})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
