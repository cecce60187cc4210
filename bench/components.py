"""Components: each step of an admitted ask and of a poll, timed alone in this process (median wall us per
call over many calls, on the same Redis), to say what costs what without a sampler's blur.

Steps that use the synchronous Redis client (RQ) block the event loop for their whole time; the async ones
let it serve other requests while Redis answers, so their wall time overstates their cost to throughput.
Run alone: `python -m bench.components`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import redis
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from api.context import AppContext
from api.enqueue import enqueue_ask
from api.jobview import read_view
from bench.common import PERMISSIVE, Section, bench_settings, cookie, flush, md_table, require_redis
from shared.admission import LeaseRef
from shared.models import AskAccepted, AskRequest
from worker.claude import die_with_parent, spawn_options

CALLS = 400
SPAWNED: list[subprocess.Popen[bytes]] = []


async def timed(call: Callable[[], Awaitable[Any]], calls: int = CALLS) -> float:
    """Median microseconds of one awaited call, after a warm-up."""
    for _ in range(20):
        await call()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        await call()
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1000


def sync(fn: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    async def call() -> Any:
        return fn()

    return call


async def measure(work: Path) -> list[tuple[str, str, float]]:
    settings = bench_settings(work, **PERMISSIVE)
    ctx = AppContext.open(settings)
    user = "comp-user"
    request = Request({"type": "http", "method": "POST", "path": "/agent/ask", "query_string": b"",
                       "headers": [(b"cookie", f"session={cookie(user)}".encode())]})
    body = b'{"session_id": "' + str(uuid.uuid4()).encode() + b'", "message": "hello from the bench"}'

    def ref() -> LeaseRef:
        return LeaseRef(user=user, session_id=str(uuid.uuid4()), job_id=str(uuid.uuid4()))

    def enqueue_rq_unique() -> None:
        r = ref()
        ctx.queue.enqueue("worker.jobs.run_ask", kwargs={"user": r.user, "session_id": r.session_id,
                                                         "message": "hi"}, job_id=r.job_id, unique=True,
                          meta={"user": r.user, "session_id": r.session_id})

    def enqueue_recorded() -> None:
        r = ref()
        with ctx.rq_redis.pipeline() as pipe:
            ctx.queue.enqueue("worker.jobs.run_ask", kwargs={"user": r.user, "session_id": r.session_id,
                                                             "message": "hi"}, job_id=r.job_id,
                              meta={"user": r.user, "session_id": r.session_id}, pipeline=pipe)

    job_ref = ref()
    await enqueue_ask(ctx, job_ref, "hello")
    steps: list[tuple[str, str, Callable[[], Awaitable[Any]]]] = [
        ("floor", "one async Redis GET", lambda: ctx.redis.get("bench:floor")),
        ("both", "thread-pool hop (run_in_threadpool of a no-op: each sync dependency)",
         lambda: run_in_threadpool(lambda: None)),
        ("both", "cookie check (SignedCookieAuth.user)", lambda: ctx.auth.user(request)),
        ("ask", "body validation (AskRequest.model_validate_json)", sync(lambda: AskRequest.model_validate_json(body))),
        ("ask", "admission Lua (AsyncAdmission.admit, 1 async round trip)", lambda: ctx.admission.admit(ref())),
        ("ask", "enqueue as called (api/enqueue.py: RQ's commands recorded, 1 async round trip)",
         lambda: enqueue_ask(ctx, ref(), "hello")),
        ("ask", "  of which RQ's Python (Queue.enqueue into a pipeline never sent: no I/O)",
         sync(enqueue_recorded)),
        ("ask", "RQ's own enqueue with unique=True, for comparison (sync client: blocks the loop throughout)",
         sync(enqueue_rq_unique)),
        ("ask", "audit line (AuditLog.write: open, write, close)",
         sync(lambda: ctx.audit.write("enqueued", user=user, job_id="x", message="hello"))),
        ("ask", "202 body (AskAccepted)",
         sync(lambda: AskAccepted(job_id="x", session_id="y", position=3).model_dump())),
        ("poll", "poll read (read_view: 1 async pipeline + build_view)", lambda: read_view(ctx, job_ref.job_id, user)),
    ]
    true = shutil.which("true") or "/bin/true"
    as_now, now_options = spawn_options([true], os.environ["PATH"])
    for name, cmd, preexec in (
            ("spawn a child as worker/claude.py does (spawn_options: through setpriv, vfork)", as_now,
             now_options.get("preexec_fn")),
            ("spawn a child with preexec_fn=die_with_parent (its fallback without setpriv: fork)", [true],
             die_with_parent),
            ("spawn a child without any death-with-parent guarantee (vfork)", [true], None)):
        steps.append(("worker", f"{name}: Popen only", sync(partial(spawn, cmd, preexec))))
    try:
        return [(kind, name, await timed(call, 100)) for kind, name, call in steps]
    finally:
        await ctx.close()


def spawn(cmd: list[str], preexec: Callable[[], None] | None) -> None:
    """Popen as the work-horse does (new session, stdin closed); the child is reaped outside the timing."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=preexec)
    SPAWNED.append(proc)
    if len(SPAWNED) > 20:
        for old in SPAWNED:
            old.wait()
        SPAWNED.clear()


def run(work: Path, conn: redis.Redis) -> Section:
    flush(conn)
    rows = asyncio.run(measure(work))
    flush(conn)
    table = md_table(["path", "step", "median us per call"], [[k, n, f"{us:,.0f}"] for k, n, us in rows])
    rss_mib = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    body = (f"Each step called {CALLS} times (spawns: 100) in one process against the same Redis; median wall time. "
            f"This process holds {rss_mib:.0f} MiB RSS; the cost of a fork grows with it. 'Popen only': the child's "
            "exec (of setpriv, then of the target) happens after Popen returns.\n\n"
            + table)
    return Section("Components of the request paths, timed alone", body, data={"rows": rows})


def main() -> int:
    argparse.ArgumentParser(prog="python -m bench.components", description=__doc__).parse_args()
    print(run(Path(tempfile.mkdtemp(prefix="bench-components-")), require_redis()).body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
