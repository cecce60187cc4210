"""The real ``claude`` CLI (pinned in ``claude-cli.version``) and ``tests/fake_claude.py`` honour the same contract.

Every contract test runs twice: against the real CLI (installed by ``scripts/install-claude``, driven offline
against ``devtools.standin``; these halves carry the ``real_cli`` marker) and against the fake (driven by its
``[[directive]]`` prompts). Both halves assert the same expectations, so a difference between fake and real
fails one of them. A few tests compare the two directly (result fields and their types, transcript layout).

Installation failures fail the tests (never skip): the worker's contract is only proven against the real CLI.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devtools.standin import DEMO_TEXT, MessagesStandin, last_user_text
from tests.fake_claude import encode_project_dir

REPO = Path(__file__).resolve().parent.parent
FAKE = REPO / "tests" / "fake_claude.py"
# Run the fake with this interpreter: `#!/usr/bin/env python3` may go through a slow shim (pyenv: +0.3 s a run).
# test_version_is_the_pinned_one runs it through its shebang.
FAKE_ARGV = [sys.executable, str(FAKE)]
INSTALLER = REPO / "scripts" / "install-claude"
PINNED = (REPO / "claude-cli.version").read_text().strip()

REAL = pytest.param("real", marks=pytest.mark.real_cli, id="real")
BOTH = [REAL, pytest.param("fake", id="fake")]

# The flags the worker passes (DESIGN.md section 4), minus the session flag and the message.
WORKER_FLAGS = [
    "-p",
    "--output-format",
    "json",
    "--model",
    "claude-opus-5-5",
    "--tools",
    "",
    "--permission-mode",
    "dontAsk",
    "--max-turns",
    "4",
    "--strict-mcp-config",
    "--setting-sources",
    "",
]
# Result fields the worker reads.
RESULT_FIELDS = {
    "type",
    "subtype",
    "is_error",
    "api_error_status",
    "duration_ms",
    "num_turns",
    "result",
    "stop_reason",
    "session_id",
    "total_cost_usd",
    "usage",
    "permission_denials",
    "terminal_reason",
    "uuid",
}


# --- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_claude_bin() -> Path:
    """Install (or find) the pinned CLI; a failure here fails the test."""
    try:
        proc = subprocess.run(
            [str(INSTALLER)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"scripts/install-claude could not run: {exc}")
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.fail(f"scripts/install-claude failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_absolute() and os.access(path, os.X_OK), path
    return path


@pytest.fixture(scope="module")
def standin() -> Iterator[MessagesStandin]:
    with MessagesStandin() as s:
        yield s


@pytest.fixture(autouse=True)
def _reset_standin(request: pytest.FixtureRequest) -> None:
    if "standin" in request.fixturenames:
        s: MessagesStandin = request.getfixturevalue("standin")
        s.reset()


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def json(self) -> dict[str, Any]:
        assert self.stdout.count("\n") <= 1, self.stdout[:2000]
        obj = json.loads(self.stdout)
        assert isinstance(obj, dict), obj
        return obj

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


@dataclass
class Cli:
    """One way of running ``claude``: the real binary against the stand-in, or the fake."""

    kind: str
    argv0: list[str]
    base: Path
    standin: MessagesStandin
    config_dir: Path = field(init=False)
    cwd: Path = field(init=False)

    def __post_init__(self) -> None:
        self.config_dir = self.base / "config"
        self.cwd = self.base / "work"
        for d in (self.config_dir, self.cwd, self.base / "home", self.base / "tmp"):
            d.mkdir(parents=True, exist_ok=True)

    @property
    def real(self) -> bool:
        return self.kind == "real"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TZ") if k in os.environ}
        env.update(
            ANTHROPIC_BASE_URL=self.standin.url,
            ANTHROPIC_API_KEY="sk-ant-test-any",
            CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
            CLAUDE_CONFIG_DIR=str(self.config_dir),
            HOME=str(self.base / "home"),
            CLAUDE_CODE_TMPDIR=str(self.base / "tmp"),
            CLAUDE_CODE_MAX_RETRIES="0",
        )
        env.update(extra or {})
        return env

    def popen(
        self, args: list[str], message: str | None, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        argv = [*self.argv0, *args] + (["--", message] if message is not None else [])
        return subprocess.Popen(
            argv,
            cwd=cwd or self.cwd,
            env=self.env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(
        self,
        args: list[str],
        message: str | None,
        cwd: Path | None = None,
        stdin: str | None = None,
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> Result:
        argv = [*self.argv0, *args] + (["--", message] if message is not None else [])
        start = time.monotonic()
        proc = subprocess.run(
            argv,
            cwd=cwd or self.cwd,
            env=self.env(env),
            input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)

    def turn(self, session: str, first: bool, message: str, extra: list[str] | None = None) -> Result:
        flag = "--session-id" if first else "--resume"
        return self.run([*WORKER_FLAGS, *(extra or []), flag, session], message)

    def transcript_path(self, session: str, cwd: Path | None = None) -> Path:
        return self.config_dir / "projects" / encode_project_dir(os.path.realpath(cwd or self.cwd)) / f"{session}.jsonl"

    def transcript(self, session: str, cwd: Path | None = None) -> list[dict[str, Any]]:
        path = self.transcript_path(session, cwd)
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def api_error(self, status: int) -> str:
        """The message that makes this CLI hit an API error with ``status``."""
        if self.real:
            self.standin.push("error", status=status)
            return "hello"
        return f"hello [[api-error {status}]]"


@pytest.fixture(params=BOTH)
def cli(request: pytest.FixtureRequest, tmp_path: Path, standin: MessagesStandin) -> Cli:
    if request.param == "real":
        binary: Path = request.getfixturevalue("real_claude_bin")
        return Cli("real", [str(binary)], tmp_path, standin)
    return Cli("fake", FAKE_ARGV, tmp_path, standin)


def new_session() -> str:
    return str(uuid.uuid4())


def users(lines: list[dict[str, Any]]) -> list[str]:
    """The prompts of a transcript (user lines with string content)."""
    return [
        line["message"]["content"]
        for line in lines
        if line.get("type") == "user" and isinstance(line.get("message", {}).get("content"), str)
    ]


def assistant_texts(lines: list[dict[str, Any]]) -> list[str]:
    return [
        block["text"]
        for line in lines
        if line.get("type") == "assistant"
        for block in line["message"]["content"]
        if block.get("type") == "text"
    ]


def check_chain(lines: list[dict[str, Any]], session: str) -> None:
    uuids = [line["uuid"] for line in lines if "uuid" in line and "parentUuid" in line]
    assert len(uuids) == len(set(uuids))
    known: set[str] = set()
    for line in lines:
        assert line.get("sessionId", session) == session
        if "parentUuid" in line:
            parent = line["parentUuid"]
            assert parent is None or parent in known, f"dangling parentUuid in {line['type']} line"
            known.add(line["uuid"])
            assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", line["timestamp"])


# --- the contract ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BOTH)
def test_version_is_the_pinned_one(kind: str, request: pytest.FixtureRequest) -> None:
    argv0 = [str(request.getfixturevalue("real_claude_bin"))] if kind == "real" else [str(FAKE)]
    proc = subprocess.run([*argv0, "--version"], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"{PINNED} (Claude Code)"


def test_two_turns_session_id_then_resume(cli: Cli) -> None:
    session = new_session()
    first = cli.turn(session, True, "My name is Alice.")
    assert first.returncode == 0, first.stderr
    r1 = first.json()
    assert (r1["type"], r1["subtype"], r1["is_error"], r1["session_id"]) == ("result", "success", False, session)
    assert r1["num_turns"] == 1 and r1["stop_reason"] == "end_turn" and r1["terminal_reason"] == "completed"
    assert r1["result"].endswith("My name is Alice.")
    assert r1["api_error_status"] is None and r1["permission_denials"] == []

    second = cli.turn(session, False, "What is my name?")
    assert second.returncode == 0, second.stderr
    r2 = second.json()
    assert r2["session_id"] == session and r2["is_error"] is False
    assert r2["result"].endswith("What is my name?")
    assert r2["uuid"] != r1["uuid"]
    # 2.1.332: total_cost_usd is cumulative over the session.
    assert r2["total_cost_usd"] > r1["total_cost_usd"] > 0
    if cli.real:
        assert r1["result"].startswith("STUB REPLY #1 (request had 2 messages)")
        reqs = cli.standin.message_requests
        assert len(reqs) == 2
        assert reqs[1].path.startswith("/v1/messages")
        assert last_user_text(reqs[1]) == "What is my name?"
        earlier = json.dumps(reqs[1].messages[:-1])
        assert "My name is Alice." in earlier and "STUB REPLY #1" in earlier
        assert reqs[1].headers.get("x-claude-code-session-id") == session
    else:
        assert r1["result"] == "FAKE REPLY #1 to: My name is Alice."
        assert r2["result"] == "FAKE REPLY #2 to: What is my name?"

    path = cli.transcript_path(session)
    assert path.is_file()
    assert (path.stat().st_mode & 0o777) == 0o600
    lines = cli.transcript(session)
    check_chain(lines, session)
    assert users(lines) == ["My name is Alice.", "What is my name?"]
    texts = assistant_texts(lines)
    assert len(texts) == 2 and texts[0] == r1["result"] and texts[1] == r2["result"]
    types = {line["type"] for line in lines}
    assert {"queue-operation", "user", "assistant", "attachment", "last-prompt"} <= types
    last_prompts = [line for line in lines if line["type"] == "last-prompt"]
    assert last_prompts[-1]["lastPrompt"] == "What is my name?"
    # The second prompt continues the first turn's chain.
    by_uuid = {line["uuid"]: line for line in lines if "uuid" in line and "parentUuid" in line}
    second_user = next(
        line for line in lines if line["type"] == "user" and line["message"]["content"] == "What is my name?"
    )
    node: dict[str, Any] | None = second_user
    seen = []
    while node is not None:
        seen.append(node.get("type"))
        node = by_uuid.get(node["parentUuid"]) if node["parentUuid"] else None
    assert seen.count("user") == 2 and "assistant" in seen
    assert all(line["cwd"] == str(cli.cwd) for line in lines if "cwd" in line)


def test_unknown_resume_fails_before_any_api_call(cli: Cli) -> None:
    missing = new_session()
    res = cli.run([*WORKER_FLAGS, "--resume", missing], "hi")
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr.strip() == f"No conversation found with session ID: {missing}"
    assert cli.standin.message_requests == []


def test_reused_session_id_fails(cli: Cli) -> None:
    session = new_session()
    assert cli.turn(session, True, "first").returncode == 0
    before = cli.transcript_path(session).read_bytes()
    res = cli.turn(session, True, "again")
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr.strip() == f"Error: Session ID {session} is already in use."
    assert cli.transcript_path(session).read_bytes() == before


@pytest.mark.parametrize(
    ("args", "stderr"),
    [
        (
            [
                "--session-id",
                "22222222-2222-4333-8444-555555555555",
                "--resume",
                "11111111-2222-4333-8444-555555555555",
            ],
            "Error: --session-id with --continue or --resume also needs --fork-session.",
        ),
        (["--session-id", "nope"], "Error: Invalid session ID. Must be a valid UUID."),
        (["--session-id", "a8098c1af86e11dabd1a00112444be1e"], "Error: Invalid session ID. Must be a valid UUID."),
        (
            ["--resume", "not-a-uuid"],
            "Error: --resume requires a valid session ID or session title when used with --print. Usage: claude -p "
            '--resume <session-id|title>. Provided value "not-a-uuid" is not a UUID and does not match any session '
            "title.",
        ),
        (
            ["--output-format", "stream-json"],
            "Error: When using --print, --output-format=stream-json requires --verbose",
        ),
        (["--bogus"], "error: unknown option '--bogus'"),
        (
            ["--output-format", "xml"],
            "error: option '--output-format <format>' argument 'xml' is invalid. Allowed choices are text, json, "
            "stream-json.",
        ),
        (
            ["--permission-mode", "yolo"],
            "error: option '--permission-mode <mode>' argument 'yolo' is invalid. Allowed choices are acceptEdits, "
            "auto, bypassPermissions, manual, dontAsk, plan.",
        ),
        (["--max-turns", "abc"], "error: option '--max-turns <turns>' argument 'abc' is invalid. must be a number"),
    ],
    ids=[
        "session-id+resume",
        "session-id-invalid",
        "session-id-no-dashes",
        "resume-not-uuid",
        "stream-json-needs-verbose",
        "unknown-option",
        "bad-output-format",
        "bad-permission-mode",
        "bad-max-turns",
    ],
)
def test_failures_before_any_api_call(cli: Cli, args: list[str], stderr: str) -> None:
    res = cli.run(["-p", "--output-format", "json", *args], "hi")
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr.strip() == stderr
    assert cli.standin.message_requests == []


def test_dangerously_skip_permissions_refused_as_root(cli: Cli) -> None:
    if os.geteuid() != 0:
        pytest.skip("only refused when running as root")
    res = cli.run(["-p", "--output-format", "json", "--dangerously-skip-permissions"], "hi")
    assert (res.returncode, res.stdout) == (1, "")
    assert "cannot be used with root/sudo privileges" in res.stderr


def test_any_uuid_shape_is_a_valid_session_id(cli: Cli) -> None:
    for session in ("00000000-0000-0000-0000-000000000000", "a8098c1a-f86e-11da-bd1a-00112444be1e"):
        res = cli.turn(session, True, "hi")
        assert res.returncode == 0, res.stderr
        assert res.json()["session_id"] == session


@pytest.mark.parametrize(
    ("status", "error_type", "result_start"),
    [
        (500, "api_error", "API Error: 500 "),
        (529, "overloaded_error", "API Error: 529 Overloaded"),
        (401, "authentication_error", "Invalid API key"),
        (429, "rate_limit_error", "API Error: Request rejected (429)"),
    ],
)
def test_api_error_exits_1_with_is_error_and_subtype_success(
    cli: Cli, status: int, error_type: str, result_start: str
) -> None:
    session = new_session()
    res = cli.turn(session, True, cli.api_error(status))
    assert res.returncode == 1
    r = res.json()
    assert r["type"] == "result" and r["subtype"] == "success" and r["is_error"] is True
    assert r["api_error_status"] == status and r["api_error_type"] == error_type
    assert r["result"].startswith(result_start)
    assert r["terminal_reason"] == "api_error" and r["num_turns"] == 1 and r["total_cost_usd"] == 0
    assert r["session_id"] == session
    if cli.real:
        assert len(cli.standin.message_requests) == 1  # CLAUDE_CODE_MAX_RETRIES=0 (+ x-should-retry: false)
    lines = cli.transcript(session)
    check_chain(lines, session)
    synthetic = [line for line in lines if line["type"] == "assistant"]
    assert len(synthetic) == 1
    assert synthetic[0]["message"]["model"] == "<synthetic>"
    assert synthetic[0]["isApiErrorMessage"] is True and synthetic[0]["apiErrorStatus"] == status
    assert synthetic[0]["message"]["content"][0]["text"] == r["result"]
    if status != 500:
        return
    # The session stays usable (for the real CLI the failed prompt is sent again, merged into the next one).
    again = cli.turn(session, False, "after the error")
    assert again.returncode == 0, again.stderr
    assert again.json()["is_error"] is False


def test_stream_json_verbose_ends_with_the_result_line(cli: Cli) -> None:
    session = new_session()
    res = cli.run(["-p", "--output-format", "stream-json", "--verbose", "--session-id", session], "hello")
    assert res.returncode == 0, res.stderr
    lines = res.lines()
    assert lines[0]["type"] == "system" and lines[0]["subtype"] == "init"
    assert lines[0]["session_id"] == session and lines[0]["cwd"] == str(cli.cwd)
    assert lines[0]["claude_code_version"] == PINNED
    assistants = [line for line in lines if line["type"] == "assistant"]
    assert assistants and all(line["session_id"] == session for line in assistants)
    assert assistants[-1]["message"]["content"][-1]["type"] == "text"
    last = lines[-1]
    assert last["type"] == "result" and last["subtype"] == "success" and last["is_error"] is False
    assert RESULT_FIELDS <= set(last)
    assert last["result"] == assistants[-1]["message"]["content"][-1]["text"]
    assert all(line["type"] != "result" for line in lines[:-1])


def test_stream_json_api_error(cli: Cli) -> None:
    res = cli.run(["-p", "--output-format", "stream-json", "--verbose"], cli.api_error(500))
    assert res.returncode == 1
    lines = res.lines()
    assert lines[0]["subtype"] == "init"
    assert lines[-1]["type"] == "result" and lines[-1]["is_error"] is True and lines[-1]["api_error_status"] == 500
    assert any(line["type"] == "assistant" and line["message"]["model"] == "<synthetic>" for line in lines)


def test_json_verbose_prints_an_array(cli: Cli) -> None:
    res = cli.run(["-p", "--output-format", "json", "--verbose"], "hello")
    assert res.returncode == 0, res.stderr
    arr = json.loads(res.stdout)
    assert isinstance(arr, list)
    assert arr[0]["type"] == "system" and arr[-1]["type"] == "result"


def test_text_output(cli: Cli) -> None:
    res = cli.run(["-p", "--output-format", "text"], "hello")
    assert res.returncode == 0
    assert res.stdout.endswith("hello\n") and res.stdout.count("\n") == 1
    err = cli.run(["-p", "--output-format", "text"], cli.api_error(500))
    assert err.returncode == 1 and err.stdout.startswith("API Error: 500 ")


def test_prompt_handling(cli: Cli) -> None:
    # After `--`, a prompt may start with '-'; only the first word after `--` is the prompt.
    res = cli.run(["-p", "--output-format", "json", "--tools", "", "--"], None)
    assert res.returncode == 1
    res = cli.run(["-p", "--output-format", "json", "--tools", ""], "-x hello")
    assert res.returncode == 0, res.stderr
    assert res.json()["result"].endswith("-x hello")
    res = cli.run(["-p", "--output-format", "json", "--", "first", "second"], None)
    assert res.json()["result"].endswith("first")
    # The prompt on stdin; a prompt plus stdin are joined by a newline.
    res = cli.run(["-p", "--output-format", "json"], None, stdin="from stdin")
    assert res.json()["result"].endswith("from stdin")
    res = cli.run(["-p", "--output-format", "json", "--", "arg"], None, stdin="and stdin")
    assert res.json()["result"].endswith("arg\nand stdin")
    # No prompt at all.
    res = cli.run(["-p", "--output-format", "json"], None, stdin="")
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr.strip() == (
        "Error: Input must be provided either through stdin or as a prompt argument when using --print"
    )
    # A variadic option swallows a prompt placed after it.
    res = cli.run(["-p", "--output-format", "json", "--tools", "", "hello there"], None)
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr.splitlines() == [
        '"hello there" was read as a value of --tools, not as a prompt · put a prompt before --tools or after --',
        "Error: Input must be provided either through stdin or as a prompt argument when using --print",
    ]
    if cli.real:
        assert [last_user_text(r) for r in cli.standin.message_requests] == [
            "-x hello",
            "first",
            "from stdin",
            "arg\nand stdin",
        ]


def test_max_turns_error(cli: Cli) -> None:
    if cli.real:
        cli.standin.set_mode("tool_use", tool_input={"command": "echo hi", "description": "say hi"})
        message = "loop"
    else:
        message = "loop [[max-turns]]"
    args = ["-p", "--output-format", "json", "--tools", "Bash", "--allowedTools", "Bash", "--permission-mode"]
    res = cli.run([*args, "dontAsk", "--max-turns", "1"], message)
    assert res.returncode == 1
    r = res.json()
    assert r["subtype"] == "error_max_turns" and r["is_error"] is True
    assert r["errors"] == ["Reached maximum number of turns (1)"]
    assert "result" not in r and "api_error_status" not in r
    assert r["terminal_reason"] == "max_turns" and r["stop_reason"] == "tool_use" and r["num_turns"] == 2
    text = cli.run([*args, "dontAsk", "--max-turns", "1", "--output-format", "text"], message)
    assert (text.returncode, text.stdout) == (1, "Error: Reached max turns (1)")


@pytest.mark.parametrize(
    ("flags", "denied", "tool_error"),
    [
        (["--tools", "", "--permission-mode", "dontAsk"], False, "No such tool available: Bash"),
        (
            ["--tools", "Bash", "--permission-mode", "dontAsk"],
            True,
            "denied because Claude Code is running in don't ask",
        ),
        (["--tools", "Bash", "--allowedTools", "Bash", "--permission-mode", "dontAsk"], False, None),
    ],
    ids=["no-tools", "dontAsk-not-allowed", "dontAsk-allowed"],
)
def test_tool_use_and_permissions(cli: Cli, flags: list[str], denied: bool, tool_error: str | None) -> None:
    session = new_session()
    marker = cli.cwd / "marker"
    if cli.real:
        # Not `echo`: the real CLI runs a bare `echo` even in dontAsk mode without --allowedTools.
        cli.standin.push("tool_use", tool_input={"command": f"touch {marker}", "description": "make a marker"})
        message = "run something"
    else:
        message = "run something [[tool Bash]]"
    res = cli.run(["-p", "--output-format", "json", *flags, "--session-id", session], message)
    assert res.returncode == 0, res.stderr
    r = res.json()
    assert r["subtype"] == "success" and r["is_error"] is False and r["num_turns"] == 2
    if denied:
        assert len(r["permission_denials"]) == 1
        assert r["permission_denials"][0]["tool_name"] == "Bash"
        assert set(r["permission_denials"][0]) == {"tool_name", "tool_use_id", "tool_input"}
    else:
        assert r["permission_denials"] == []
    lines = cli.transcript(session)
    check_chain(lines, session)
    results = [
        block
        for line in lines
        if line["type"] == "user" and isinstance(line["message"]["content"], list)
        for block in line["message"]["content"]
        if block.get("type") == "tool_result"
    ]
    assert len(results) == 1
    assert results[0]["is_error"] is (tool_error is not None)
    if tool_error:
        assert tool_error in results[0]["content"]
    tool_uses = [
        b
        for line in lines
        if line["type"] == "assistant"
        for b in line["message"]["content"]
        if b["type"] == "tool_use"
    ]
    assert len(tool_uses) == 1 and tool_uses[0]["name"] == "Bash"
    if cli.real:
        assert marker.exists() is (tool_error is None and not denied)
        followup = cli.standin.message_requests[-1]
        assert any(b.get("type") == "tool_result" for b in followup.messages[-1]["content"])


def _wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_mid_turn_keeps_the_prompt_and_resume_works(cli: Cli, sig: signal.Signals) -> None:
    session = new_session()
    assert cli.turn(session, True, "first message").returncode == 0
    if cli.real:
        cli.standin.set_mode("slow", delay=20)
        message = "second message"
    else:
        message = "second message [[hang]]"
    proc = cli.popen([*WORKER_FLAGS, "--resume", session], message)
    try:
        if cli.real:
            cli.standin.wait_for_requests(2, timeout=20)
        _wait_for(lambda: message in users(cli.transcript(session)))
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert out == ""
    assert proc.returncode == (143 if sig == signal.SIGTERM else -9)
    lines = cli.transcript(session)
    assert users(lines) == ["first message", message]
    assert lines[-1]["type"] != "assistant" and not any(
        line["type"] == "assistant" and message in json.dumps(line) for line in lines
    )
    cli.standin.set_mode("text")
    res = cli.turn(session, False, "third message")
    assert res.returncode == 0, res.stderr
    assert res.json()["result"].endswith("third message")
    lines = cli.transcript(session)
    check_chain(lines, session)
    assert users(lines) == ["first message", message, "third message"]
    synthetic = [line for line in lines if line["type"] == "assistant" and line["message"]["model"] == "<synthetic>"]
    assert [s["message"]["content"][0]["text"] for s in synthetic] == ["No response requested."]
    if cli.real:
        roles = [m["role"] for m in cli.standin.message_requests[-1].messages if m["role"] != "system"]
        assert roles == ["user", "assistant", "user", "assistant", "user"]


def test_session_ids_are_case_sensitive(cli: Cli) -> None:
    session = new_session()
    assert cli.turn(session, True, "one").returncode == 0
    res = cli.turn(session.upper(), False, "two")
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr.strip() == f"No conversation found with session ID: {session.upper()}"
    res = cli.turn(session.upper(), True, "three")
    assert res.returncode == 0 and res.json()["session_id"] == session.upper()
    assert users(cli.transcript(session.upper())) == ["three"]


def test_transcript_location(cli: Cli) -> None:
    # A long cwd (past 200 characters) is cut and gets a hash; a symlinked cwd is resolved (physical path).
    long_cwd = cli.base / "/".join("d" * 50 + str(i) for i in range(4)) / "wörk dir"
    long_cwd.mkdir(parents=True)
    link = cli.base / "link"
    link.symlink_to(cli.cwd)
    s1, s2 = new_session(), new_session()
    assert cli.run([*WORKER_FLAGS, "--session-id", s1], "hi", cwd=long_cwd).returncode == 0
    assert cli.run([*WORKER_FLAGS, "--session-id", s2], "hi", cwd=link).returncode == 0
    names = sorted(p.name for p in (cli.config_dir / "projects").iterdir())
    long_name = encode_project_dir(str(long_cwd))
    assert len(long_name) > 200 and re.match(r"^.{200}-[0-9a-z]+$", long_name)
    assert names == sorted([long_name, encode_project_dir(str(cli.cwd))])
    assert cli.transcript_path(s1, long_cwd).is_file()
    assert (cli.config_dir / "projects" / encode_project_dir(str(cli.cwd)) / f"{s2}.jsonl").is_file()


def test_resume_finds_the_session_from_another_cwd(cli: Cli) -> None:
    # --resume looks in every project dir and appends to the original file; --session-id only refuses an id
    # already used in the *current* project. The worker must therefore run every turn in the same cwd.
    session = new_session()
    other = cli.base / "other"
    other.mkdir()
    assert cli.turn(session, True, "one").returncode == 0
    res = cli.run([*WORKER_FLAGS, "--resume", session], "two", cwd=other)
    assert res.returncode == 0, res.stderr
    assert users(cli.transcript(session)) == ["one", "two"]
    assert not cli.transcript_path(session, other).exists()
    res = cli.run([*WORKER_FLAGS, "--session-id", session], "three", cwd=other)
    assert res.returncode == 0, res.stderr
    assert users(cli.transcript(session, other)) == ["three"]


# --- real-only: retries, timing, cost -------------------------------------------------------------------------


@pytest.mark.real_cli
def test_real_retries_are_bounded_by_the_env(real_claude_bin: Path, tmp_path: Path, standin: MessagesStandin) -> None:
    cli = Cli("real", [str(real_claude_bin)], tmp_path, standin)
    # Without x-should-retry the CLI would retry; CLAUDE_CODE_MAX_RETRIES=0 makes it a single request.
    standin.set_mode("error", status=500, should_retry=None)
    res = cli.run(WORKER_FLAGS, "hello")
    assert res.returncode == 1 and res.json()["api_error_status"] == 500
    assert len(standin.message_requests) == 1 and res.seconds < 5
    standin.clear_requests()
    res = cli.run(WORKER_FLAGS, "hello", env={"CLAUDE_CODE_MAX_RETRIES": "2"})
    assert res.returncode == 1 and res.json()["api_error_status"] == 500
    assert len(standin.message_requests) == 3  # ~0.6 s + ~1.2 s of backoff
    assert 1.0 < res.seconds < 10
    # x-should-retry: false stops retries whatever the env says.
    standin.clear_requests()
    standin.set_mode("error", status=529, should_retry=False)
    res = cli.run(WORKER_FLAGS, "hello", env={"CLAUDE_CODE_MAX_RETRIES": "2"})
    assert res.returncode == 1 and len(standin.message_requests) == 1


@pytest.mark.real_cli
def test_real_midstream_error_falls_back_to_a_non_streaming_request(
    real_claude_bin: Path, tmp_path: Path, standin: MessagesStandin
) -> None:
    cli = Cli("real", [str(real_claude_bin)], tmp_path, standin)
    # An `error` event after message_start: with CLAUDE_CODE_MAX_RETRIES=0 the CLI asks again without `stream`.
    standin.push("error", status=529, midstream=True)
    res = cli.run(WORKER_FLAGS, "hello")
    assert res.returncode == 0 and res.json()["is_error"] is False
    assert [q.streaming for q in standin.message_requests] == [True, False]
    # When the fallback fails too, it is an ordinary API error.
    standin.clear_requests()
    standin.push("error", status=529, midstream=True)
    standin.push("error", status=529)
    res = cli.run(WORKER_FLAGS, "hello")
    r = res.json()
    assert res.returncode == 1 and r["is_error"] is True and r["subtype"] == "success"
    assert r["api_error_status"] == 529
    assert [q.streaming for q in standin.message_requests] == [True, False]


@pytest.mark.real_cli
def test_real_turn_cost(real_claude_bin: Path, tmp_path: Path, standin: MessagesStandin) -> None:
    cli = Cli("real", [str(real_claude_bin)], tmp_path, standin)
    proc = cli.popen([*WORKER_FLAGS, "--session-id", new_session()], "hello")
    start = time.monotonic()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == 0 and json.loads(out)["is_error"] is False
    peak_mb = usage.ru_maxrss / 1024
    sys.stderr.write(f"real claude turn: {wall:.2f} s wall, {peak_mb:.0f} MB peak RSS\n")
    assert wall < 10 and peak_mb < 1024


# --- fake and real side by side ---------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__


@pytest.mark.real_cli
def test_fake_result_fields_match_the_real_ones(
    real_claude_bin: Path, tmp_path: Path, standin: MessagesStandin
) -> None:
    real = Cli("real", [str(real_claude_bin)], tmp_path / "real", standin)
    fake = Cli("fake", FAKE_ARGV, tmp_path / "fake", standin)
    pairs = []
    for cli in (real, fake):
        s = new_session()
        ok = cli.turn(s, True, "hello").json()
        err = cli.turn(new_session(), True, cli.api_error(500)).json()
        if cli.real:
            standin.set_mode("tool_use")
        mt = cli.run(
            ["-p", "--output-format", "json", "--tools", "Bash", "--allowedTools", "Bash"]
            + ["--permission-mode", "dontAsk", "--max-turns", "1"],
            "x" if cli.real else "x [[max-turns]]",
        ).json()
        standin.set_mode("text")
        stream = cli.run(["-p", "--output-format", "stream-json", "--verbose"], "hello").lines()
        pairs.append((ok, err, mt, stream))
    (rok, rerr, rmt, rstream), (fok, ferr, fmt, fstream) = pairs
    for real_obj, fake_obj in ((rok, fok), (rerr, ferr), (rmt, fmt), (rstream[-1], fstream[-1])):
        assert RESULT_FIELDS - {"result", "api_error_status"} <= set(fake_obj)
        missing = set(fake_obj) - set(real_obj)
        assert not missing, f"the fake prints fields the real CLI does not: {missing}"
        for key in set(fake_obj) & set(real_obj):
            assert _type_name(fake_obj[key]) == _type_name(real_obj[key]), key
        for key in ("type", "subtype", "is_error", "api_error_status", "stop_reason", "terminal_reason", "num_turns"):
            assert fake_obj.get(key, "absent") == real_obj.get(key, "absent"), key
        assert set(fake_obj["usage"]) <= set(real_obj["usage"])
    assert [line["type"] for line in fstream] == [line["type"] for line in rstream]
    assert set(fstream[0]) <= set(rstream[0])
    assert set(fstream[1]) <= set(rstream[1]) and set(fstream[1]["message"]) <= set(rstream[1]["message"])


@pytest.mark.real_cli
def test_fake_transcript_lines_look_like_the_real_ones(
    real_claude_bin: Path, tmp_path: Path, standin: MessagesStandin
) -> None:
    real = Cli("real", [str(real_claude_bin)], tmp_path / "real", standin)
    fake = Cli("fake", FAKE_ARGV, tmp_path / "fake", standin)
    found = []
    for cli in (real, fake):
        s = new_session()
        assert cli.turn(s, True, "one").returncode == 0
        assert cli.turn(s, False, "two").returncode == 0
        found.append(cli.transcript(s))
    real_lines, fake_lines = found
    real_types = {line["type"] for line in real_lines}
    assert {line["type"] for line in fake_lines} <= real_types
    for kind in ("user", "assistant", "last-prompt", "queue-operation"):
        real_keys = set().union(*(set(line) for line in real_lines if line["type"] == kind))
        fake_keys = set().union(*(set(line) for line in fake_lines if line["type"] == kind))
        assert fake_keys <= real_keys, (kind, fake_keys - real_keys)
    for kind in ("user", "assistant"):
        real_msg = next(line["message"] for line in real_lines if line["type"] == kind)
        fake_msg = next(line["message"] for line in fake_lines if line["type"] == kind)
        assert set(fake_msg) <= set(real_msg)
        assert type(fake_msg["content"]) is type(real_msg["content"])


# --- the fake's own test hooks --------------------------------------------------------------------------------


def _fake(tmp_path: Path, standin: MessagesStandin) -> Cli:
    return Cli("fake", FAKE_ARGV, tmp_path, standin)


def test_fake_directives(tmp_path: Path, standin: MessagesStandin) -> None:
    cli = _fake(tmp_path, standin)
    res = cli.run(WORKER_FLAGS, "[[garbage]]")
    assert res.returncode == 0 and res.stdout.strip()
    with pytest.raises(json.JSONDecodeError):
        json.loads(res.stdout)
    res = cli.run(WORKER_FLAGS, "[[empty]]")
    assert (res.returncode, res.stdout) == (0, "")
    res = cli.run(WORKER_FLAGS, "[[exit 7]]")
    assert res.returncode == 7 and res.stdout == "" and res.stderr.strip()
    res = cli.run(WORKER_FLAGS, "[[big 100000]]")
    assert len(res.json()["result"].encode()) == 100000
    res = cli.run(WORKER_FLAGS, "[[tool Read]]")
    r = res.json()
    assert r["num_turns"] == 2 and "Read" in r["result"]
    start = time.monotonic()
    res = cli.run(["-p", "--output-format", "stream-json", "--verbose"], "[[sleep 0.5]]")
    assert time.monotonic() - start >= 0.5
    lines = res.lines()
    assert lines[1]["type"] == "assistant" and lines[1]["message"]["content"][0]["type"] == "tool_use"
    assert lines[-1]["type"] == "result" and lines[-1]["is_error"] is False


def test_fake_pidfile_and_log(tmp_path: Path, standin: MessagesStandin) -> None:
    cli = _fake(tmp_path, standin)
    piddir = tmp_path / "pids"
    log = tmp_path / "fake.log"
    env = {"FAKE_CLAUDE_PIDFILE_DIR": str(piddir), "FAKE_CLAUDE_LOG": str(log)}
    res = cli.run(WORKER_FLAGS, "hello", env=env)
    assert res.returncode == 0
    assert list(piddir.iterdir()) == []
    proc = cli.popen(WORKER_FLAGS, "[[hang]]", env=env)
    try:
        _wait_for(lambda: (piddir / str(proc.pid)).exists())
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143 and out == ""
    assert list(piddir.iterdir()) == []
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(entries) == 2
    assert entries[0]["argv"] == [*WORKER_FLAGS, "--", "hello"]
    assert "CLAUDE_CONFIG_DIR" in entries[0]["env_keys"] and "ANTHROPIC_API_KEY" in entries[0]["env_keys"]
    assert "ANTHROPIC_API_KEY" not in entries[0]["env"]
    assert entries[0]["stdin"] == "devnull" and entries[0]["cwd"] == str(cli.cwd)


# --- the installer and the stand-in ---------------------------------------------------------------------------


def test_installer_rejects_a_bad_version_file(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "install-claude"
    script.write_bytes(INSTALLER.read_bytes())
    script.chmod(0o755)
    (tmp_path / "claude-cli.version").write_text("latest\n")
    proc = subprocess.run([str(script)], capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode != 0 and proc.stdout == ""
    assert "bad version 'latest'" in proc.stderr


@pytest.mark.real_cli
def test_installer_is_idempotent(real_claude_bin: Path) -> None:
    proc = subprocess.run([str(INSTALLER)], capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [str(real_claude_bin)]
    assert "already installed" in proc.stderr
    assert f"/claude-cli/{PINNED}/" in str(real_claude_bin)


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        url + "/v1/messages?beta=true", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def _sse_events(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]


def test_standin_modes(standin: MessagesStandin) -> None:
    user = {
        "role": "user",
        "content": [
            {"type": "text", "text": "<system-reminder>\nx\n</system-reminder>"},
            {"type": "text", "text": "hi"},
        ],
    }
    body: dict[str, Any] = {"model": "m", "stream": True, "messages": [user]}
    for method, path, code in (("HEAD", "/", 200), ("HEAD", "/api/hello", 200), ("GET", "/nope", 404)):
        req = urllib.request.Request(standin.url + path, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == code
        except urllib.error.HTTPError as err:
            with err:
                assert err.code == code
    status, headers, raw = _post(standin.url, body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = _sse_events(raw)
    assert [e["type"] for e in events][:2] == ["message_start", "content_block_start"]
    assert [e["type"] for e in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text == "STUB REPLY #1 (request had 1 messages). You said: hi"
    # Non-streaming fallback.
    status, _, raw = _post(standin.url, {**body, "stream": False})
    assert status == 200 and json.loads(raw)["content"][0]["text"].endswith("You said: hi")
    # One-shot error, then the mode again.
    standin.push("error", status=529)
    status, headers, raw = _post(standin.url, body)
    assert status == 529 and headers["x-should-retry"] == "false"
    assert json.loads(raw) == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded (stub)"}}
    assert _post(standin.url, body)[0] == 200
    # Tool use, then a reply quoting the tool result.
    standin.push("tool_use", tool_input={"command": "ls"})
    events = _sse_events(_post(standin.url, body)[2])
    start = next(e for e in events if e["type"] == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["name"] == "Bash"
    partial = "".join(e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta")
    assert json.loads(partial) == {"command": "ls"}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "a.txt"}]}
    follow = {**body, "stream": False, "messages": [user, {"role": "assistant", "content": []}, result]}
    assert json.loads(_post(standin.url, follow)[2])["content"][0]["text"] == 'Tool said: "a.txt"'
    # Demo mode says what it is.
    standin.set_mode("demo")
    reply = json.loads(_post(standin.url, {**body, "stream": False})[2])["content"][0]["text"]
    assert "not a real model" in reply and reply == DEMO_TEXT.replace("{k}", "1").replace("{prompt}", "hi")
    # Slow: the delay is honoured.
    standin.set_mode("slow", delay=0.3)
    start_t = time.monotonic()
    assert _post(standin.url, body)[0] == 200
    assert time.monotonic() - start_t >= 0.3
    recorded = standin.message_requests
    assert recorded[0].headers["content-type"] == "application/json" and recorded[0].body == body
    assert last_user_text(recorded[0]) == "hi" and standin.last_user_text(body) == "hi"


def test_standin_runs_in_the_foreground() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.standin", "--port", "0", "--mode", "demo"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert url, line
        body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
        reply = json.loads(_post(url.group(0), body)[2])["content"][0]["text"]
        assert "demo stand-in" in reply and reply.endswith("You said: hello")
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0
