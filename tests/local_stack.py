"""`overlord-agent run` as a real subprocess for the local-stack and browser tests: its output, its process
tree (read from /proc, independently of the supervisor's own bookkeeping), and a small HTTP client."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support import free_port, wait_until

OVERLORD_AGENT = Path(sys.executable).parent / "overlord-agent"
TERMINAL = ("finished", "failed", "canceled", "expired")
READY = re.compile(r"^run \| Ready: open (http://\S+)/agent/$", re.M)
SCRUBBED = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "CLAUDE_CODE_OAUTH_TOKEN",
            "CLAUDE_CONFIG_DIR", "OVERLORD_STANDIN_DELAY_S")


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of a process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], fields[19]


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _mentions(pid: int, needle: bytes) -> bool:
    try:
        if needle in os.readlink(f"/proc/{pid}/cwd").encode():
            return True
        return any(needle in Path(f"/proc/{pid}/{part}").read_bytes() for part in ("cmdline", "environ"))
    except OSError:
        return False


class RunningStack:
    """Runs `overlord-agent run` in `workdir` (so its ./var is there) with a clean AGENT_* environment.

    A thread records every descendant (pid, start time, command line) while it runs, so that afterwards the test
    can check that each one is gone, including the short-lived claude processes."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_") and k not in SCRUBBED}
        # No claude login visible to the auto-detection: a fresh machine, whatever this one has.
        base_env |= {"AGENT_PORT": str(self.port), "CLAUDE_CONFIG_DIR": str(workdir / "no-claude-login")}
        self.env = base_env | (env or {})
        self.log_path = workdir / "run.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen([str(OVERLORD_AGENT), "run"], cwd=workdir, env=self.env, stdin=subprocess.DEVNULL,
                                      stdout=self._log, stderr=subprocess.STDOUT)
        self.seen: dict[int, tuple[str, str]] = {}  # pid -> (start time, command line)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._record, daemon=True)
        self._thread.start()
        self.base_url = ""

    def _record(self) -> None:
        while not self._stop.is_set():
            self.record_tree()
            self._stop.wait(0.05)

    def record_tree(self) -> None:
        parents: dict[int, list[int]] = {}
        starts: dict[int, str] = {}
        for pid in _all_pids():
            stat = _stat(pid)
            if stat:
                parents.setdefault(stat[0], []).append(pid)
                starts[pid] = stat[2]
        todo = [self.popen.pid]
        while todo:
            for pid in parents.get(todo.pop(), []):
                todo.append(pid)
                if pid not in self.seen:
                    try:
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    except OSError:
                        cmd = "?"
                    self.seen[pid] = (starts[pid], cmd.strip())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 600) -> str:
        """The page's base URL, once the run command says it is ready (the first run may install the CLI)."""

        def ready() -> str | None:
            if self.popen.poll() is not None:
                raise AssertionError(f"overlord-agent run exited {self.popen.returncode}:\n{self.log()}")
            match = READY.search(self.log())
            return match.group(1) if match else None

        self.base_url = str(wait_until(ready, timeout_s, 0.1, "overlord-agent run to be ready"))
        return self.base_url

    def pids_of(self, needle: str) -> list[int]:
        """Live recorded descendants whose command line contains `needle`."""
        self.record_tree()
        return [pid for pid, (start, cmd) in self.seen.items() if needle in cmd and self._alive(pid, start)]

    @staticmethod
    def _alive(pid: int, start: str) -> bool:
        stat = _stat(pid)
        return stat is not None and stat[2] == start and stat[1] != "Z"

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 60) -> int:
        self.popen.send_signal(sig)
        return self.wait_exit(timeout_s)

    def wait_exit(self, timeout_s: float = 60) -> int:
        try:
            code = self.popen.wait(timeout_s)
        finally:
            self._stop.set()
            self._thread.join(5)
        return code

    def leftovers(self) -> list[str]:
        """Every recorded descendant still alive, and any process at all that mentions the work dir."""
        left = [f"{pid} {cmd}" for pid, (start, cmd) in self.seen.items() if self._alive(pid, start)]
        needle = str(self.workdir).encode()
        for pid in _all_pids():
            stat = _stat(pid)
            if pid != os.getpid() and stat and stat[1] != "Z" and pid not in self.seen and _mentions(pid, needle):
                left.append(f"{pid} (not a descendant) {Path(f'/proc/{pid}/cmdline').read_bytes()[:200]!r}")
        return left

    def close(self) -> None:
        """Teardown: whatever happened, nothing this stack started survives the test."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._stop.set()
        self._thread.join(5)
        for pid, (start, _) in self.seen.items():
            if self._alive(pid, start):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


def ask(base_url: str, message: str, timeout_s: float = 120) -> tuple[str, dict[str, Any]]:
    """A new session, one question as the dev user, the finished (or failed) job: (session id, job)."""
    with httpx.Client(base_url=base_url, timeout=40) as http:
        session = http.post("/agent/sessions/new")
        assert session.status_code == 200, session.text
        session_id = str(session.json()["session_id"])
        asked = http.post("/agent/ask", json={"session_id": session_id, "message": message})
        assert asked.status_code == 202, asked.text
        job_id = asked.json()["job_id"]
        deadline = time.monotonic() + timeout_s
        while True:
            job = http.get(f"/agent/jobs/{job_id}", params={"wait": 20})
            assert job.status_code == 200, job.text
            body: dict[str, Any] = job.json()
            if body["status"] in TERMINAL:
                return session_id, body
            assert time.monotonic() < deadline, f"job still {body['status']} after {timeout_s} s"


def history(base_url: str, session_id: str) -> list[tuple[str, str]]:
    reply = httpx.get(f"{base_url}/agent/sessions/{session_id}/history", timeout=10)
    assert reply.status_code == 200, reply.text
    return [(m["role"], m["text"]) for m in reply.json()["messages"]]
