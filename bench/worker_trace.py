"""A traced `overlord-agent worker` for the dispatch profile: wall-clock enter/exit stamps of the steps
between a job reaching the worker and `claude` starting (and after it ends), in the parent and the horse.

A sampling profiler sees little of a 30 ms work-horse, so this wraps the named functions instead (a few
microseconds each) and appends `E|X pid name ns` lines to $BENCH_TRACE_FILE with one O_APPEND write each.
Nothing in the project is changed: the wrappers are installed in this process before the worker starts.
Run: `python -m bench.worker_trace --name N` (the same settings environment as `overlord-agent worker`).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# module:attribute path, in the order they run for one job.
TRACED = [
    "rq.worker.base:BaseWorker.dequeue_job_and_maintain_ttl",
    "rq.worker.base:BaseWorker.prepare_execution",
    "rq.worker.worker_classes:Worker.fork_work_horse",
    "rq.worker.base:BaseWorker.main_work_horse",
    "rq.worker.base:BaseWorker.prepare_job_execution",
    "redis.connection:AbstractConnection.connect",
    "worker.jobs:run_ask",
    "worker.jobs:_horse_dies_with_worker",
    "shared.admission:SyncAdmission.renew",
    "shared.audit:AuditLog.write",
    "worker.claude:ClaudeRunner.run_turn",
    "subprocess:Popen.__init__",
    "worker.claude:ClaudeRunner._supervise",
    "shutil:rmtree",
    "worker.jobs:finished",
    "rq.worker.base:BaseWorker._finalize_success",
    "rq.worker.worker_classes:Worker.monitor_work_horse",
]


def _writer(path: str) -> Callable[[str], None]:
    def write(line: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    return write


def _wrap(name: str, func: Callable[..., Any], write: Callable[[str], None]) -> Callable[..., Any]:
    @functools.wraps(func)
    def traced(*args: Any, **kwargs: Any) -> Any:
        write(f"E {os.getpid()} {name} {time.time_ns()}\n")
        try:
            return func(*args, **kwargs)
        finally:
            write(f"X {os.getpid()} {name} {time.time_ns()}\n")

    return traced


def install(path: str) -> None:
    write = _writer(path)
    for spec in TRACED:
        module_name, attr = spec.split(":")
        owner: Any = importlib.import_module(module_name)
        *parents, leaf = attr.split(".")
        for part in parents:
            owner = getattr(owner, part)
        setattr(owner, leaf, _wrap(attr, getattr(owner, leaf), write))


def read(path: Path) -> list[tuple[str, int, str, int]]:
    """(E or X, pid, name, ns) in file order."""
    events = []
    for line in path.read_text().splitlines():
        kind, pid, name, ns = line.split(" ")
        events.append((kind, int(pid), name, int(ns)))
    return events


def main() -> int:
    trace = os.environ.get("BENCH_TRACE_FILE")
    if not trace:
        raise SystemExit("bench.worker_trace: set BENCH_TRACE_FILE")
    install(trace)
    from shared.cli import main as cli_main

    return cli_main(["worker", *sys.argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main())
