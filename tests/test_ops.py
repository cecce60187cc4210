"""What ops use beside systemd: status, drain, and a graceful worker stop that never fails a job."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

from shared.settings import Settings
from tests.lifecycle import Client, claude_pids, terminal_events
from tests.support import Proc, make_cookie, settings_env, wait_until

Stack = Callable[..., str]


def cli(settings: Settings, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    env = settings_env(settings) | {"PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


def test_status_shows_queue_running_jobs_and_workers(
    stack: Stack, settings: Settings, rconn: redis.Redis, pid_dir: Path
) -> None:
    base = stack(workers=1)
    alice, bob = Client(base, make_cookie("alice")), Client(base, make_cookie("bob"))
    running = alice.ask(alice.new_session(), "[[sleep 5]] long")
    alice.wait_status(running, "started")
    queued = bob.ask(bob.new_session(), "waiting")
    status = json.loads(cli(settings, "status", "--json").stdout)
    assert status["queued"] == 1 and status["oldest_queued_age_s"] is not None
    assert [(j["job_id"], j["user"]) for j in status["running"]] == [(running, "alice")]
    assert len(status["workers"]) == 1 and status["workers"][0]["current_job"] == running
    text = cli(settings, "status").stdout
    assert "1 queued" in text and f"running {running} user=alice" in text
    assert bob.wait_done(queued, 30)["status"] == "finished"
    alice.close()
    bob.close()


def test_drain_refuses_new_asks_waits_for_the_queue_and_undo_admits_again(
    stack: Stack, settings: Settings, rconn: redis.Redis
) -> None:
    base = stack(workers=1)
    alice = Client(base, make_cookie("alice"))
    session = alice.new_session()
    job_id = alice.ask(session, "[[sleep 2]] in flight")
    drained = cli(settings, "drain", "--wait", "20")
    assert drained.returncode == 0 and "drained" in drained.stdout, drained.stdout + drained.stderr
    assert alice.job(job_id)["status"] == "finished", "draining lets the job in flight finish"
    refused = alice.http.post("/agent/ask", json={"session_id": session, "message": "during the deploy"})
    assert refused.status_code == 503 and refused.json()["code"] == "draining"
    assert refused.headers["Retry-After"]
    assert cli(settings, "drain", "--undo").returncode == 0
    assert alice.wait_done(alice.ask(session, "after the deploy"))["status"] == "finished"
    alice.close()


def test_sigterm_lets_the_job_in_flight_finish_then_the_worker_exits(
    stack: Stack, settings: Settings, rconn: redis.Redis, procs: list[Proc], pid_dir: Path
) -> None:
    alice = Client(stack(workers=1), make_cookie("alice"))
    worker = procs[1]
    job_id = alice.ask(alice.new_session(), "[[sleep 3]] deploy while I run")
    wait_until(lambda: claude_pids(pid_dir), 10, what="claude to start")
    worker.signal(signal.SIGTERM)  # what systemctl stop sends first (KillMode=mixed: the main process only)
    body = alice.wait_done(job_id, 30)
    assert body["status"] == "finished", body
    assert terminal_events(settings.audit_log, job_id) == ["ask_ok"]
    wait_until(lambda: not worker.alive(), 10, what="the worker to exit after its job")
    alice.close()


def test_sigterm_stops_an_idle_worker_at_once(stack: Stack, procs: list[Proc]) -> None:
    stack(workers=1)
    worker = procs[1]
    t0 = time.monotonic()
    worker.signal(signal.SIGTERM)
    wait_until(lambda: not worker.alive(), 5, what="the idle worker to exit")
    assert worker.popen.returncode == 0 and time.monotonic() - t0 < 5
