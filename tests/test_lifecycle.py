"""The ask pipeline end to end: real API process, real `overlord-agent worker` processes, real Redis,
and tests/fake_claude.py honouring the CLI's contract. Each failure shows what the user sees, that the
lease is freed, that no claude process is left, and that exactly one terminal audit line was written."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import redis

from shared.settings import Settings
from tests.conftest import SettingsFactory
from tests.lifecycle import Client, assert_no_leftovers, claude_pids, parent_pid, terminal_events
from tests.support import Proc, audit_lines, make_cookie, start_worker, wait_until

Stack = Callable[..., str]


@pytest.fixture
def alice_client(stack: Stack) -> Iterator[Client]:
    client = Client(stack(), make_cookie("alice"))
    yield client
    client.close()


def test_two_turns_second_resumes_and_history_has_both(
    alice_client: Client, settings: Settings, rconn: redis.Redis, pid_dir: Path, tmp_path: Path
) -> None:
    session = alice_client.new_session()
    first = alice_client.wait_done(alice_client.ask(session, "My name is Alice."))
    assert first["status"] == "finished", first
    assert first["result"]["result"] == "FAKE REPLY #1 to: My name is Alice."
    assert first["result"]["session_id"] == session and first["result"]["is_error"] is False
    second = alice_client.wait_done(alice_client.ask(session, "What is my name?"))
    assert second["status"] == "finished", second
    assert second["result"]["result"] == "FAKE REPLY #2 to: What is my name?"
    assert [(m["role"], m["text"]) for m in alice_client.history(session)] == [
        ("user", "My name is Alice."), ("assistant", "FAKE REPLY #1 to: My name is Alice."),
        ("user", "What is my name?"), ("assistant", "FAKE REPLY #2 to: What is my name?"),
    ]
    for body in (first, second):
        assert terminal_events(settings.audit_log, body["job_id"]) == ["ask_ok"]
        started = [a for a in audit_lines(settings.audit_log)
                   if a["event"] == "ask_start" and a["job_id"] == body["job_id"]]
        assert len(started) == 1 and started[0]["user"] == "alice"
    assert_no_leftovers(rconn, "alice", session, pid_dir)


def test_cli_arguments_env_and_resume_decision(
    make_settings: SettingsFactory, rconn: redis.Redis, stack: Stack, tmp_path: Path
) -> None:
    log = tmp_path / "fake.log"
    os.environ["FAKE_CLAUDE_LOG"] = str(log)
    os.environ["ANTHROPIC_API_KEY"] = "sk-test"
    try:
        s = make_settings(claude_model="claude-test", claude_append_system_prompt="Be brief.", claude_max_turns=3)
        client = Client(stack(settings_=s), make_cookie("alice"))
        session = client.new_session()
        assert client.wait_done(client.ask(session, "-starts with a dash"))["status"] == "finished"
        assert client.wait_done(client.ask(session, "again"))["status"] == "finished"
        client.close()
    finally:
        del os.environ["FAKE_CLAUDE_LOG"], os.environ["ANTHROPIC_API_KEY"]
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(runs) == 2
    first, second = runs[0]["argv"], runs[1]["argv"]
    assert first[first.index("--session-id") + 1] == session and "--resume" not in first
    assert second[second.index("--resume") + 1] == session and "--session-id" not in second
    assert first[-2:] == ["--", "-starts with a dash"]
    for flag, value in (("--model", "claude-test"), ("--append-system-prompt", "Be brief."), ("--max-turns", "3")):
        assert first[first.index(flag) + 1] == value
    env_keys = set(runs[0]["env_keys"])
    assert {"CLAUDE_CONFIG_DIR", "CLAUDE_CODE_TMPDIR", "CLAUDE_CODE_MAX_RETRIES", "ANTHROPIC_API_KEY"} <= env_keys
    assert not [k for k in env_keys if k.startswith("AGENT_")], "no service setting or secret reaches claude"
    assert runs[0]["stdin"] in ("devnull", "closed", "null", "eof"), runs[0]["stdin"]
    assert Path(runs[0]["cwd"]) == s.claude_cwd.resolve()


@pytest.mark.parametrize(
    ("message", "code", "fragment"),
    [
        ("[[api-error 529]] hi", "claude_error", "API Error: 529"),
        ("[[garbage]]", "bad_output", "not a result"),
        ("[[empty]]", "bad_output", "result"),
        ("[[exit 3]]", "claude_error", "exit 3"),
        ("[[big 70000]]", "bad_output", "more than 65536 bytes"),
        ("[[max-turns]]", "max_turns", "turns without finishing"),
    ],
)
def test_claude_failures_become_clear_errors(
    make_settings: SettingsFactory, rconn: redis.Redis, stack: Stack, pid_dir: Path,
    message: str, code: str, fragment: str,
) -> None:
    s = make_settings(claude_output_max_bytes=65536)
    client = Client(stack(settings_=s), make_cookie("alice"))
    session = client.new_session()
    body = client.wait_done(client.ask(session, message))
    assert body["status"] == "failed", body
    assert body["error"]["code"] == code and fragment in body["error"]["message"], body["error"]
    assert "Traceback" not in body["error"]["message"]
    assert terminal_events(s.audit_log, body["job_id"]) == ["ask_error"]
    assert_no_leftovers(rconn, "alice", session, pid_dir)
    after = client.wait_done(client.ask(session, "still usable?"))
    assert after["status"] == "finished", after
    client.close()


def test_claude_not_installed_on_the_worker_fails_the_job_with_a_message_for_the_operator(
    make_settings: SettingsFactory, rconn: redis.Redis, stack: Stack, pid_dir: Path
) -> None:
    s = make_settings(claude_bin="claude-not-installed-here")
    client = Client(stack(settings_=s), make_cookie("alice"))
    session = client.new_session()
    body = client.wait_done(client.ask(session, "hello"))
    assert body["status"] == "failed" and body["error"]["code"] == "claude_error", body
    assert "claude-not-installed-here" in body["error"]["message"] and "not installed" in body["error"]["message"]
    assert terminal_events(s.audit_log, body["job_id"]) == ["ask_error"]
    assert_no_leftovers(rconn, "alice", session, pid_dir)
    client.close()


def test_claude_hanging_past_the_timeout_is_killed(
    make_settings: SettingsFactory, rconn: redis.Redis, stack: Stack, pid_dir: Path
) -> None:
    s = make_settings(job_timeout_s=2)
    client = Client(stack(settings_=s), make_cookie("alice"))
    session = client.new_session()
    t0 = time.monotonic()
    body = client.wait_done(client.ask(session, "[[hang]]"))
    assert body["status"] == "failed" and body["error"] == {"code": "timeout",
                                                            "message": "claude timed out after 2 s"}
    assert time.monotonic() - t0 < 8
    assert terminal_events(s.audit_log, body["job_id"]) == ["ask_error"]
    assert_no_leftovers(rconn, "alice", session, pid_dir)
    client.close()


def test_progress_is_visible_while_claude_runs(alice_client: Client, pid_dir: Path) -> None:
    session = alice_client.new_session()
    job_id = alice_client.ask(session, "[[sleep 3]] look around")
    body = wait_until(lambda: (b := alice_client.job(job_id)).get("progress", {}).get("tool") and b, 10,
                      what="progress with a tool")
    assert body["status"] == "started" and body["progress"]["turns"] >= 1 and body["progress"]["tool"] == "Bash"
    assert alice_client.wait_done(job_id)["status"] == "finished"


def test_kill_9_of_the_work_horse_fails_the_job_as_worker_lost(
    alice_client: Client, settings: Settings, rconn: redis.Redis, pid_dir: Path
) -> None:
    session = alice_client.new_session()
    job_id = alice_client.ask(session, "[[hang]]")
    claude = wait_until(lambda: claude_pids(pid_dir), 10, what="claude to start")[0]
    os.kill(parent_pid(claude), signal.SIGKILL)  # the work-horse: what the OOM killer does
    body = alice_client.wait_done(job_id, 10)
    assert body["status"] == "failed" and body["error"]["code"] == "worker_lost", body
    assert "please ask again" in body["error"]["message"] and "signal 9" in body["error"]["message"]
    assert terminal_events(settings.audit_log, job_id) == ["worker_lost"]
    assert_no_leftovers(rconn, "alice", session, pid_dir)
    assert alice_client.wait_done(alice_client.ask(session, "next"))["status"] == "finished"


def test_kill_9_of_the_whole_worker_is_detected_by_another_worker(
    stack: Stack, settings: Settings, rconn: redis.Redis, pid_dir: Path, procs: list[Proc], tmp_path: Path
) -> None:
    client = Client(stack(workers=1), make_cookie("alice"))
    session = client.new_session()
    job_id = client.ask(session, "[[hang]]")
    claude = wait_until(lambda: claude_pids(pid_dir), 10, what="claude to start")[0]
    worker = procs[1]
    assert parent_pid(parent_pid(claude)) == worker.pid
    t0 = time.monotonic()
    worker.signal(signal.SIGKILL)  # the worker's parent process, as a crash or `kill -9` would
    wait_until(lambda: not claude_pids(pid_dir), 5, what="claude to die with its worker")
    procs.append(start_worker(settings, tmp_path, "rescuer", {"FAKE_CLAUDE_PIDFILE_DIR": str(pid_dir)}))
    body = client.wait_done(job_id, 120)
    lost_after_s = time.monotonic() - t0
    assert body["status"] == "failed" and body["error"]["code"] == "worker_lost", body
    assert lost_after_s < 90, lost_after_s
    assert terminal_events(settings.audit_log, job_id) == ["worker_lost"]
    assert_no_leftovers(rconn, "alice", session, pid_dir)
    assert client.wait_done(client.ask(session, "after the crash"))["status"] == "finished"
    client.close()


def test_delete_stops_a_running_job_and_its_claude(
    alice_client: Client, settings: Settings, rconn: redis.Redis, pid_dir: Path
) -> None:
    session = alice_client.new_session()
    job_id = alice_client.ask(session, "[[hang]]")
    wait_until(lambda: claude_pids(pid_dir), 10, what="claude to start")
    reply = alice_client.http.delete(f"/agent/jobs/{job_id}")
    assert reply.status_code == 200 and reply.json()["status"] == "canceled", reply.text
    assert reply.json()["error"]["code"] == "canceled"
    again = alice_client.http.delete(f"/agent/jobs/{job_id}")
    assert again.status_code == 200 and again.json()["status"] == "canceled"
    assert terminal_events(settings.audit_log, job_id) == ["canceled"]
    assert_no_leftovers(rconn, "alice", session, pid_dir)
    assert alice_client.wait_done(alice_client.ask(session, "after stop"))["status"] == "finished"


def test_two_workers_drain_one_queue(
    stack: Stack, settings: Settings, rconn: redis.Redis, pid_dir: Path
) -> None:
    base = stack(workers=2)
    clients = [Client(base, make_cookie(f"user{n}")) for n in range(6)]
    jobs = [(c, c.ask(c.new_session(), "[[sleep 1]] work")) for c in clients]
    bodies = [c.wait_done(j, 30) for c, j in jobs]
    assert [b["status"] for b in bodies] == ["finished"] * 6
    workers = {line["worker"] for line in audit_lines(settings.audit_log) if line["event"] == "ask_ok"}
    assert len(workers) == 2, workers
    for _, job_id in jobs:
        assert terminal_events(settings.audit_log, job_id) == ["ask_ok"]
    for c in clients:
        c.close()
    wait_until(lambda: not claude_pids(pid_dir), 5, what="no claude left")


def test_queued_ask_past_its_ttl_expires(
    make_settings: SettingsFactory, rconn: redis.Redis, tmp_path: Path, procs: list[Proc], pid_dir: Path
) -> None:
    from tests.support import start_api

    s = make_settings(queue_ttl_s=1)
    api, base = start_api(s, tmp_path)
    procs.append(api)
    client = Client(base, make_cookie("alice"))
    session = client.new_session()
    job_id = client.ask(session, "nobody is working")
    time.sleep(1.5)
    procs.append(start_worker(s, tmp_path, "late", {"FAKE_CLAUDE_PIDFILE_DIR": str(pid_dir)}))
    body = wait_until(lambda: (b := client.job(job_id))["status"] == "expired" and b, 10, what="expiry")
    assert body["error"]["code"] == "expired" and "waited more than 1 s" in body["error"]["message"]
    assert terminal_events(s.audit_log, job_id) == ["expired"]
    assert not [a for a in audit_lines(s.audit_log) if a["event"] == "ask_start"], "an expired ask never runs"
    assert_no_leftovers(rconn, "alice", session, pid_dir)
    assert client.wait_done(client.ask(session, "fresh"))["status"] == "finished"
    client.close()


def test_keyspace_after_finished_failed_and_canceled_jobs(
    alice_client: Client, settings: Settings, rconn: redis.Redis, pid_dir: Path
) -> None:
    session = alice_client.new_session()
    done = alice_client.wait_done(alice_client.ask(session, "ok"))["job_id"]
    failed = alice_client.wait_done(alice_client.ask(session, "[[api-error 500]]"))["job_id"]
    running = alice_client.ask(session, "[[hang]]")
    wait_until(lambda: claude_pids(pid_dir), 10, what="claude to start")
    assert alice_client.http.delete(f"/agent/jobs/{running}").json()["status"] == "canceled"
    keys = {k.decode() for k in rconn.keys("agent:*") if isinstance(k, bytes)}
    assert keys == {
        "agent:rate:alice",
        f"agent:owner:{session}",
        *(f"agent:auditend:{job}" for job in (done, failed, running)),
    }
    for key in keys:
        ttl = rconn.pttl(key)
        assert ttl > 0, key
    assert rconn.pttl("agent:rate:alice") <= settings.rate_window_s * 1000
    assert rconn.zcard("agent:rate:alice") == 3


def test_worker_refuses_functions_and_callbacks_not_on_the_allow_list(
    stack: Stack, settings: Settings, rconn: redis.Redis, tmp_path: Path, procs: list[Proc]
) -> None:
    from rq import Queue
    from rq.callbacks import Callback
    from rq.serializers import JSONSerializer

    stack(workers=1)
    marker = tmp_path / "pwned"
    queue = Queue(settings.queue, connection=rconn, serializer=JSONSerializer)
    evil = queue.enqueue("os.system", f"touch {marker}")
    sneaky = queue.enqueue("worker.jobs.run_ask", kwargs={"user": "x", "session_id": "y", "message": "z"},
                           meta={"user": "x", "session_id": "y"}, on_failure=Callback("os.system"))
    for job in (evil, sneaky):
        wait_until(partial(lambda j: j.get_status() == "failed", job), 15, what=f"{job.func_name} to be refused")
    time.sleep(0.5)
    assert not marker.exists(), "a function off the allow-list ran"
    assert procs[1].alive(), "the worker survives refusing a job"
    assert "is not allowed" in (evil.latest_result().exc_string or "")  # type: ignore[union-attr]
