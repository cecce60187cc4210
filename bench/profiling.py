"""Profiles for missed targets: py-spy samples a process under load; stacks are split into cost buckets.

py-spy runs with `--nonblocking` (it never pauses the process, so the load is hardly slowed) and `--idle`;
idle samples are dropped here by their leaf frame (a thread-pool thread waiting for work, the event loop
waiting in epoll). What is left is the event loop's busy wall time, including the time it sits blocked
in a synchronous Redis call. Each busy stack goes to one bucket (a step of the service when any frame
matches one, else the layer of its innermost matching frame), so the shares add up to 100%; divided by
the requests wrk completed while sampled, they become microseconds of event-loop time per request.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from bench.common import ROOT, BenchError, WrkResult, md_table

T = TypeVar("T")
RATE_HZ = 250
PROFILE_S = 6.0
Load = Callable[[float], WrkResult]

@dataclass(frozen=True)
class Scheme:
    """How to read one kind of process: which samples are idle, and the buckets for the busy ones."""

    idle: str  # regex on the whole stack (root first, ';'-joined): a match is an idle sample
    steps: list[tuple[str, str]]
    layers: list[tuple[str, str]]
    whose: str  # "the event loop's time", ...
    per: str  # "request", "job"


IDLE_LEAVES = frozenset({"Condition.wait (threading.py)", "EpollSelector.select (selectors.py)",
                         "select (selectors.py)", "Event.wait (threading.py)"})
# Matched anywhere in the stack, first match wins: the service's own steps and what they call.
STEPS: list[tuple[str, str]] = [
    ("thread-pool hops (sync dependencies via run_in_threadpool)",
     r"WorkerThread|run_in_threadpool|run_sync_in_worker_thread|_write_to_self|call_soon_threadsafe"),
    ("RQ enqueue: loop blocked on Redis (sync client)", r"\(rq/.*(_read_from_socket|send_packed_command|sendall)"),
    ("RQ enqueue: Python (Job.create, serialise, pipeline)", r"\(rq/"),
    ("admission Lua call (shared/admission.py)", r"shared/admission\.py"),
    ("long-poll wait (api/jobview.py wait_view)", r"wait_view"),
    ("poll read and view (api/jobview.py)", r"api/jobview\.py"),
    ("cookie check (api/auth.py, itsdangerous)", r"api/auth\.py|\(itsdangerous/"),
    ("audit line (shared/audit.py)", r"shared/audit\.py"),
    ("the floor's endpoint (one Redis GET)", r"floor \(bench/floor\.py\)"),
    ("access log, logging", r"\(logging/|uvicorn/logging"),
    ("error answer (api/errors.py, shared/errors.py)", r"api/errors\.py|shared/errors\.py"),
]
# For the rest, the frame nearest the leaf that matches decides.
LAYERS: list[tuple[str, str]] = [
    ("HTTP parsing, socket reads and writes (uvicorn, httptools or h11)", r"\(h11/|\(httptools/|uvicorn/protocols|"
                                                                           r"uvicorn/middleware|_SelectorSocketTransport"),
    ("validation, serialisation (pydantic, FastAPI)", r"\(pydantic|fastapi/_compat|encoders\.py|"
                                                      r"fastapi/dependencies|\(json/"),
    ("other redis-py", r"\(redis/"),
    ("routing, middleware (Starlette, FastAPI)", r"\(starlette/|\(fastapi/"),
    ("asyncio event loop", r"\(asyncio/|\(anyio/"),
]


HTTP = Scheme(idle="(" + "|".join(re.escape(leaf) for leaf in IDLE_LEAVES) + ")$", steps=STEPS, layers=LAYERS,
              whose="the event loop's time", per="request")
WORKER = Scheme(
    idle=r"dequeue_job_and_maintain_ttl.*_read_from_socket|wait_for_horse|PubSubWorkerThread|"
         r"ClaudeRunner\._supervise \(worker/claude\.py\)$|(Condition|Event)\.wait \(threading\.py\)$",
    steps=[
        ("horse: start claude (Popen: through setpriv, vfork and exec)", r"Popen\.__init__"),
        ("horse: prepare_job_execution (new Redis connection, heartbeat pipeline)", r"prepare_job_execution"),
        ("horse: finished() (release lease, audit line, dedupe key)", r"finished \(worker/jobs\.py\)"),
        ("horse: rest of run_ask (settings, renew, audit, dirs, progress reads)", r"run_ask"),
        ("horse: save result and status (_finalize_success)", r"_finalize_success|handle_job_success"),
        ("horse: start-up and exit", r"main_work_horse"),
        ("worker: fork the horse", r"fork_work_horse"),
        ("worker: dequeue (BLMOVE, fetch the job)", r"dequeue_job_and_maintain_ttl"),
        ("worker: maintenance (registries, expiry sweep)", r"run_maintenance_tasks|clean_registries|sweep_expired"),
        ("worker: prepare, monitor, bookkeeping", r"execute_job|BaseWorker\.work"),
    ],
    layers=[], whose="CPU time of the worker and its work-horses", per="job")


def py_spy() -> str:
    """py-spy from PyPI, installed into this interpreter's environment when missing."""
    local = Path(sys.executable).parent / "py-spy"
    found = shutil.which("py-spy") or (str(local) if local.exists() else None)
    if found is None:
        print("bench: installing py-spy (pip install py-spy)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=False)
        found = str(local) if local.exists() else shutil.which("py-spy")
    if found is None:
        raise BenchError("py-spy is needed for profiles: pip install py-spy")
    return found


def record(pid: int, out: Path, duration_s: float, load: Callable[[], T], *, subprocesses: bool = False,
           rate_hz: int = RATE_HZ) -> T:
    """Sample `pid` (and its children with `subprocesses`) while `load()` runs; collapsed stacks go to `out`."""
    cmd = [py_spy(), "record", "--pid", str(pid), "--duration", str(round(duration_s)), "--rate", str(rate_hz),
           "--format", "raw", "--nolineno", "--idle", "--nonblocking", "--output", str(out)]
    if subprocesses:
        cmd.append("--subprocesses")
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        result = load()
    finally:
        _, err = spy.communicate(timeout=duration_s + 60)
    if not out.exists():
        raise BenchError(f"py-spy wrote no profile: {err.decode(errors='replace')[-500:]}")
    return result


def load_stacks(path: Path, scheme: Scheme = HTTP) -> list[tuple[list[str], int]]:
    """The busy stacks (root first) and their sample counts; idle samples are left out."""
    idle = re.compile(scheme.idle)
    stacks = []
    for line in path.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit() and not idle.search(_clean(frames)):
            stacks.append((_clean(frames).split(";"), int(count)))
    return stacks


def _clean(frames: str) -> str:
    frames = re.sub(r"/[^ ;()]*/site-packages/", "/", frames)
    frames = re.sub(r"/[^ ;()]*/lib/python3\.\d+/", "/", frames)
    return frames.replace(str(ROOT) + "/", "")


def buckets(stacks: list[tuple[list[str], int]], scheme: Scheme = HTTP) -> list[tuple[str, int]]:
    """(bucket, busy samples), largest first."""
    steps = [(name, re.compile(pattern)) for name, pattern in scheme.steps]
    layers = [(name, re.compile(pattern)) for name, pattern in scheme.layers]
    counts: Counter[str] = Counter()
    for frames, count in stacks:
        joined = ";".join(frames)
        name = next((n for n, rx in steps if rx.search(joined)), None)
        if name is None:
            name = next((n for f in reversed(frames) for n, rx in layers if rx.search(f)), "other")
        counts[name] += count
    return counts.most_common()


def summary(path: Path, requests: int, rps: float, title: str, scheme: Scheme = HTTP, rate_hz: int = RATE_HZ) -> str:
    """Markdown: the bucket split (share, us per request or job) and the busiest leaf functions."""
    stacks = load_stacks(path, scheme)
    busy = sum(c for _, c in stacks) or 1
    us_per_sample = 1e6 / rate_hz / max(1, requests)
    rows = [[name, f"{100 * n / busy:.1f}%", f"{n * us_per_sample:,.0f}"] for name, n in buckets(stacks, scheme)]
    rows.append(["**total busy**", "100%", f"**{busy * us_per_sample:,.0f}**"])
    rate = f" at {rps:,.0f} req/s" if rps else ""
    head = (f"**{title}** ({requests:,} {scheme.per}s{rate} while sampled; {busy} busy samples at {rate_hz} Hz)"
            "\n\n" + md_table([f"where {scheme.whose} goes", "share", f"us/{scheme.per}"], rows))
    leaves: Counter[str] = Counter()
    for frames, count in stacks:
        leaves[frames[-1]] += count
    top = [[f"`{f}`", f"{100 * n / busy:.1f}%"] for f, n in leaves.most_common(10)]
    return head + "\n\nBusiest leaf functions (self time):\n\n" + md_table(["function", "self"], top)


def profile_loads(work: Path, plan: list[tuple[int, str, Load]]) -> str:
    """One py-spy profile per (server pid, title, wrk load), each in its own run of PROFILE_S seconds."""
    parts = ["Profiles (py-spy, separate runs under the same wrk load):"]
    for n, (pid, title, load) in enumerate(plan):
        out = work / f"profile-{n}-{re.sub(r'[^a-z0-9]+', '-', title.lower())}.txt"
        during = record(pid, out, PROFILE_S, partial(load, PROFILE_S))
        parts.append(summary(out, during.requests, during.rps, title))
    return "\n\n".join(parts)
