"""What the benchmarks share: settings on Redis DB 12, the processes under test, wrk, stamps, tables.

The API and the workers run as real processes (`python -m shared.cli api|worker`, started with the test
helpers in tests/support.py); the floor and the old design run under the same uvicorn settings.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from shared.settings import Settings
from tests.support import Proc, free_port, make_cookie, start_api, start_worker, wait_until

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
STUB = BENCH_DIR / "claude_stub.sh"
WRK_LUA = BENCH_DIR / "wrk_rotate.lua"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
SECRET = "bench-secret-0123456789abcdef"
QUEUE = "bench"
PERMISSIVE: dict[str, Any] = {"rate_max": 10**9, "concurrency_per_user": 10**6, "max_queued": 10**7}


class BenchError(SystemExit):
    """A benchmark cannot run (a tool or service is missing): the message says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(f"bench: {message}")


@dataclass
class Target:
    """One goal of the issue and the figure measured for it."""

    name: str
    value: float
    goal: float
    unit: str
    higher_is_better: bool = True

    @property
    def met(self) -> bool:
        return self.value >= self.goal if self.higher_is_better else self.value < self.goal

    def row(self) -> list[str]:
        op = ">=" if self.higher_is_better else "<"
        return [self.name, f"{self.value:.1f} {self.unit}", f"{op} {self.goal:g} {self.unit}",
                "met" if self.met else "**missed**"]


@dataclass
class Section:
    """A benchmark's output: markdown for RESULTS.md and the targets it checked."""

    title: str
    body: str
    targets: list[Target] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


# --- tools and services -------------------------------------------------------------------------------------


def require_wrk() -> str:
    """wrk from Debian; installed with apt-get when missing and we are root."""
    path = shutil.which("wrk")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        print("bench: installing wrk (apt-get install -y wrk)", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, capture_output=True)
        path = shutil.which("wrk")
    if path is None:
        raise BenchError("wrk is needed for the HTTP benchmarks: apt-get install -y wrk")
    return path


def require_redis() -> redis.Redis:
    conn = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        conn.ping()
    except redis.RedisError as exc:
        raise BenchError(f"no Redis at {REDIS_URL} ({exc}): start redis-server or set BENCH_REDIS_URL") from None
    return conn


def flush(conn: redis.Redis) -> None:
    conn.flushdb()


# --- settings and processes ---------------------------------------------------------------------------------


def bench_settings(work: Path, **overrides: Any) -> Settings:
    """Signed-cookie auth (the production path), the shell stub as claude, jobs that never expire mid-run."""
    values: dict[str, Any] = {
        "redis_url": REDIS_URL, "queue": QUEUE, "key_prefix": "bench:", "auth_mode": "signed",
        "session_secret": SECRET, "audit_log": work / "audit.jsonl", "claude_bin": str(STUB),
        "claude_cwd": work / "cwd", "claude_config_dir": work / "claude", "job_timeout_s": 3600,
        "queue_ttl_s": 3600, "result_ttl_s": 3600,
    }
    values.update(overrides)
    (work / "claude" / "bench-stamps").mkdir(parents=True, exist_ok=True)
    return Settings(_env_file=None, **values)


def cookie(user: str) -> str:
    return make_cookie(user, secret=SECRET)


class Stack:
    """Processes started for one benchmark; `close` stops each with its process group."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[Proc] = []

    def api(self, settings: Settings, name: str = "api") -> tuple[Proc, str]:
        proc, base = start_api(settings, self.work, name)
        self.procs.append(proc)
        return proc, base

    def worker(self, settings: Settings, name: str, extra_env: dict[str, str] | None = None) -> Proc:
        proc = start_worker(settings, self.work, f"{name}-{os.getpid()}", extra_env)
        self.procs.append(proc)
        return proc

    def serve(self, module: str, args: list[str], name: str, ready_path: str) -> tuple[Proc, str]:
        """A bench app (`python -m bench.<module> --port P ...`), ready when `ready_path` answers."""
        port = free_port()
        proc = Proc([sys.executable, "-m", module, "--port", str(port), *args], {}, self.work / f"{name}.log")
        self.procs.append(proc)
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if not proc.alive():
                raise BenchError(f"{module} exited:\n{proc.log()}")
            try:
                return httpx.get(base + ready_path, timeout=1).status_code < 500
            except httpx.HTTPError:
                return False

        wait_until(ready, 20, what=f"{module} to answer")
        return proc, base

    def stop(self, proc: Proc) -> None:
        proc.stop()
        self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


@contextmanager
def stack(work: Path) -> Iterator[Stack]:
    running = Stack(work)
    try:
        yield running
    finally:
        running.close()


def cpu_s(pid: int, reaped_children: bool = False) -> float:
    """User + system CPU seconds a process has used so far (plus its waited-for children's, if asked)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if reaped_children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss line for {pid}")


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(") ", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


# --- wrk ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non2xx: int
    socket_errors: int
    cpu_us_per_req: float  # of the server process
    redis_reads_per_req: float  # Redis read events (about one per round trip) per request


def redis_reads(conn: redis.Redis) -> int:
    return int(conn.info("stats")["total_reads_processed"])


def run_wrk(url: str, server_pid: int, conn: redis.Redis, *, duration_s: float, connections: int,
            method: str = "GET", cookies: Path | None = None, body: str = "") -> WrkResult:
    env = os.environ | {"BENCH_METHOD": method, "BENCH_COOKIES": str(cookies or ""), "BENCH_BODY": body}
    seconds = max(1, round(duration_s))  # wrk takes whole seconds
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(WRK_LUA), url]
    cpu0, reads0 = cpu_s(server_pid), redis_reads(conn)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration_s + 60)
    cpu1, reads1 = cpu_s(server_pid), redis_reads(conn)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if out.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stdout}\n{out.stderr}")
    data = json.loads(line.split(" ", 1)[1])
    n = max(1, int(data["requests"]))
    return WrkResult(rps=n / (data["duration_us"] / 1e6), p50_ms=data["p50_us"] / 1000, p99_ms=data["p99_us"] / 1000,
                     requests=n, non2xx=int(data["non2xx"]), socket_errors=int(data["socket_errors"]),
                     cpu_us_per_req=(cpu1 - cpu0) * 1e6 / n, redis_reads_per_req=(reads1 - reads0) / n)


def median_result(runs: list[WrkResult]) -> WrkResult:
    """The per-figure median over rounds (the rounds alternate with the floor's)."""
    med = statistics.median
    return WrkResult(rps=med(r.rps for r in runs), p50_ms=med(r.p50_ms for r in runs),
                     p99_ms=med(r.p99_ms for r in runs), requests=sum(r.requests for r in runs),
                     non2xx=sum(r.non2xx for r in runs), socket_errors=sum(r.socket_errors for r in runs),
                     cpu_us_per_req=med(r.cpu_us_per_req for r in runs),
                     redis_reads_per_req=med(r.redis_reads_per_req for r in runs))


# --- stamps, percentiles, tables ----------------------------------------------------------------------------


def stamps(settings: Settings) -> dict[str, tuple[int, int | None]]:
    """Session id -> (claude start ns, claude end ns or None while it runs), as the stub wrote them."""
    folder = settings.claude_config_dir / "bench-stamps"
    found: dict[str, tuple[int, int | None]] = {}
    for start in folder.glob("*.start"):
        end = start.with_suffix(".end")
        try:
            found[start.stem] = (int(start.read_text()), int(end.read_text()) if end.exists() else None)
        except ValueError:
            continue  # being written
    return found


def wait_stamps(settings: Settings, sessions: list[str], timeout_s: float, ended: bool = True) -> None:
    def done() -> bool:
        got = stamps(settings)
        return all(s in got and (got[s][1] is not None or not ended) for s in sessions)

    wait_until(done, timeout_s, 0.01, what="claude stub stamps")


def pct(values: Sequence[float], q: float) -> float:
    """Percentile q (0-100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def now_ns() -> int:
    return time.time_ns()
