"""Client-side helpers for the job lifecycle tests: ask over HTTP, poll until done, check leftovers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import redis

from shared.audit import TERMINAL_EVENTS
from tests.support import audit_lines, live_pids, wait_until


class Client:
    """One signed-in user talking to a real API process."""

    def __init__(self, base: str, cookie: str) -> None:
        self.http = httpx.Client(base_url=base, cookies={"session": cookie}, timeout=30)

    def new_session(self) -> str:
        reply = self.http.post("/agent/sessions/new")
        assert reply.status_code == 200, reply.text
        return str(reply.json()["session_id"])

    def ask(self, session_id: str, message: str) -> str:
        reply = self.http.post("/agent/ask", json={"session_id": session_id, "message": message})
        assert reply.status_code == 202, reply.text
        return str(reply.json()["job_id"])

    def job(self, job_id: str, wait_s: float = 0) -> dict[str, Any]:
        reply = self.http.get(f"/agent/jobs/{job_id}", params={"wait": wait_s} if wait_s else None)
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        return body

    def wait_done(self, job_id: str, timeout_s: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            body = self.job(job_id, wait_s=min(10.0, max(0.5, deadline - time.monotonic())))
            if body["status"] in ("finished", "failed", "canceled", "expired"):
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {body['status']} after {timeout_s} s")

    def wait_status(self, job_id: str, status: str, timeout_s: float = 15) -> dict[str, Any]:
        result: dict[str, Any] = wait_until(lambda: (b := self.job(job_id))["status"] == status and b,
                                            timeout_s, 0.05, f"job {job_id} to be {status}")
        return result

    def history(self, session_id: str) -> list[dict[str, Any]]:
        reply = self.http.get(f"/agent/sessions/{session_id}/history")
        assert reply.status_code == 200, reply.text
        messages: list[dict[str, Any]] = reply.json()["messages"]
        return messages

    def close(self) -> None:
        self.http.close()


def terminal_events(audit_path: Path, job_id: str) -> list[str]:
    return [line["event"] for line in audit_lines(audit_path)
            if line.get("job_id") == job_id and line["event"] in TERMINAL_EVENTS]


def assert_no_leftovers(conn: redis.Redis, user: str, session_id: str, pid_dir: Path) -> None:
    """No lease, no session lock, no pending deadline, and no claude process alive."""
    assert conn.zcard(f"agent:leases:{user}") == 0, conn.zrange(f"agent:leases:{user}", 0, -1, withscores=True)
    assert conn.get(f"agent:slock:{session_id}") is None
    assert conn.zcard("agent:deadlines") == 0
    wait_until(lambda: not live_pids(pid_dir), 5, what="every claude process to be gone")


def claude_pids(pid_dir: Path) -> list[int]:
    return live_pids(pid_dir)


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])
