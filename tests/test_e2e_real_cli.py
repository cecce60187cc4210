"""End to end through the whole system with the REAL pinned claude CLI: a real API process, real Redis, a real
`overlord-agent worker` process running the binary that scripts/install-claude installs, and the offline Messages
API stand-in (devtools/standin.py) in place of Anthropic's API.

Nothing here is faked between the HTTP request and the Messages API: the worker's flags, environment, resume
decision, stream-json progress, result classification and transcript reading all meet the real CLI. An install
failure fails these tests (never skips). Timings (each test, and one ask end to end with its queueing share) are
printed in the terminal summary.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from devtools.standin import MessagesStandin, RecordedRequest
from shared.settings import Settings
from shared.transcript import read_history, transcript_path
from tests.conftest import SettingsFactory
from tests.lifecycle import Client, assert_no_leftovers, terminal_events
from tests.support import Proc, audit_lines, make_cookie, start_api, start_worker, wait_until

# The session fixture that installs (or finds) the pinned CLI and fails the test when it cannot.
from tests.test_real_cli_contract import PINNED, real_claude_bin  # noqa: F401

pytestmark = pytest.mark.real_cli

USER = "alice"
NO_PROGRESS = {"turns": 0}  # the API leaves out null fields: no tool, never updated


# --- timings, printed in the terminal summary ---------------------------------------------------------------------


@dataclass
class AskTiming:
    """One ask as the user lived it: from POST /agent/ask to the poll that saw it finished."""

    label: str
    total_s: float  # POST sent -> finished seen by the client
    post_s: float  # the POST round trip (admission + enqueue)
    queue_s: float  # RQ enqueued_at -> started_at (waiting for a worker, incl. the fork of the work-horse)
    run_s: float  # RQ started_at -> ended_at (the job: claude plus the worker's bookkeeping)
    process_s: float  # the CLI process's wall time (audit `subprocess_ms`), its start-up included
    claude_s: float  # the CLI's own duration_ms (leaves its start-up out)

    @property
    def queue_share(self) -> float:
        return self.queue_s / self.total_s if self.total_s else 0.0


@dataclass
class Timings:
    """A pytest plugin registered by this module: collects phase durations and ask timings, prints both."""

    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    asks: list[AskTiming] = field(default_factory=list)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.nodeid.startswith(Path(__file__).parent.name + "/" + Path(__file__).name):
            self.phases.setdefault(report.nodeid, {})[report.when] = report.duration

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.phases:
            return
        write = terminalreporter.write_line
        terminalreporter.section("real claude CLI end to end: wall time")
        width = max(len(n.split("::", 1)[-1]) for n in self.phases)
        write(f"{'test':<{width}}  setup    call  teardown   total")
        for nodeid, phases in self.phases.items():
            parts = [phases.get(p, 0.0) for p in ("setup", "call", "teardown")]
            write(f"{nodeid.split('::', 1)[-1]:<{width}} {parts[0]:6.2f} {parts[1]:7.2f} {parts[2]:7.2f} "
                  f"{sum(parts):7.2f} s")
        if self.asks:
            write("")
            write("one ask end to end (POST -> finished seen by a long-poll):")
            for a in self.asks:
                write(f"  {a.label:<34} total {a.total_s * 1000:6.0f} ms = POST {a.post_s * 1000:4.0f} ms"
                      f" | queued {a.queue_s * 1000:5.1f} ms ({a.queue_share:5.1%}) | job {a.run_s * 1000:5.0f} ms"
                      f" (claude process {a.process_s * 1000:4.0f} ms, its duration_ms {a.claude_s * 1000:4.0f})")
            totals = [a.total_s for a in self.asks]
            shares = [a.queue_share for a in self.asks]
            write(f"  median of {len(totals)}: {statistics.median(totals) * 1000:.0f} ms end to end, "
                  f"{statistics.median(shares):.1%} of it queueing")


@pytest.fixture(scope="session", autouse=True)
def timings(request: pytest.FixtureRequest) -> Timings:
    plugin = request.config.pluginmanager.get_plugin("e2e-real-cli-timings")
    if isinstance(plugin, Timings):
        return plugin
    fresh = Timings()
    request.config.pluginmanager.register(fresh, "e2e-real-cli-timings")
    return fresh


# --- the real CLI's processes, found in /proc ---------------------------------------------------------------------


@dataclass(frozen=True)
class CliProcess:
    pid: int
    ppid: int
    argv: list[str]


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def cli_processes(binary: Path, config_dir: Path) -> list[CliProcess]:
    """Live processes running `binary` (by exe or argv[0]) with this test's CLAUDE_CONFIG_DIR; zombies excluded."""
    wanted_env = f"CLAUDE_CONFIG_DIR={config_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            try:
                exe = os.readlink(entry / "exe")
            except OSError:
                exe = ""
            if not argv or (exe != str(binary.resolve()) and argv[0] != str(binary)):
                continue
            if wanted_env not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            found.append(CliProcess(int(entry.name), _ppid(int(entry.name)), argv))
        except (OSError, ValueError):
            continue  # it ended while we looked
    return found


# --- the stack ----------------------------------------------------------------------------------------------------


@dataclass
class E2E:
    """One test's system: API and worker processes, the stand-in, a signed-in client."""

    settings: Settings
    standin: MessagesStandin
    client: Client
    worker: Proc
    conn: redis.Redis
    binary: Path
    empty_pid_dir: Path
    timings: Timings

    def clis(self) -> list[CliProcess]:
        return cli_processes(self.binary, self.settings.claude_config_dir)

    def wait_cli(self, timeout_s: float = 15) -> CliProcess:
        """The one CLI process of this test, once it runs; it must be the grandchild of this test's worker."""
        procs: list[CliProcess] = wait_until(self.clis, timeout_s, 0.02, "the claude CLI to start")
        assert len(procs) == 1, procs
        proc = procs[0]
        horse = proc.ppid
        assert _ppid(horse) == self.worker.pid, "claude runs in a work-horse of this test's worker"
        return proc

    def assert_clean(self, session_id: str) -> None:
        """No lease, no session lock, no deadline in Redis, and no CLI process of this test left."""
        assert_no_leftovers(self.conn, USER, session_id, self.empty_pid_dir)
        wait_until(lambda: not self.clis(), 5, 0.05, "every claude process of this test to be gone")

    def ask_timed(self, session_id: str, message: str, label: str, timeout_s: float = 30) -> dict[str, Any]:
        """Ask and long-poll until it ends; record the timing of a finished ask."""
        t0 = time.monotonic()
        job_id = self.client.ask(session_id, message)
        post_s = time.monotonic() - t0
        body = self.client.wait_done(job_id, timeout_s)
        total_s = time.monotonic() - t0
        if body["status"] == "finished":
            enq, start, end = (_ts(body[k]) for k in ("enqueued_at", "started_at", "ended_at"))
            self.timings.asks.append(AskTiming(
                label=label, total_s=total_s, post_s=post_s, queue_s=(start - enq).total_seconds(),
                run_s=(end - start).total_seconds(), process_s=self.audit_ok(job_id)["subprocess_ms"] / 1000,
                claude_s=body["result"]["duration_ms"] / 1000,
            ))
        return body

    def audit_ok(self, job_id: str) -> dict[str, Any]:
        lines = [a for a in audit_lines(self.settings.audit_log) if a["event"] == "ask_ok" and a["job_id"] == job_id]
        assert len(lines) == 1, lines
        return lines[0]


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


@pytest.fixture(scope="module")
def standin() -> Iterator[MessagesStandin]:
    with MessagesStandin() as s:
        yield s


@pytest.fixture
def start_e2e(
    make_settings: SettingsFactory, rconn: redis.Redis, real_claude_bin: Path,  # noqa: F811
    standin: MessagesStandin, procs: list[Proc], tmp_path: Path, timings: Timings,
) -> Iterator[Callable[..., E2E]]:
    """Start the system with the real CLI; keyword arguments override settings."""
    standin.reset()
    clients: list[Client] = []

    def start(**overrides: Any) -> E2E:
        values: dict[str, Any] = {
            "claude_bin": str(real_claude_bin),
            "claude_max_retries": 0,
            "job_timeout_s": 60,
            # only what the CLI needs to reach the stand-in: a developer's proxy or OAuth token must not cross
            "claude_env_passthrough": ["ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"],
        }
        values.update(overrides)
        s = make_settings(**values)
        api, base = start_api(s, tmp_path)
        procs.append(api)
        worker = start_worker(s, tmp_path, f"e2e-{tmp_path.name[-12:]}",
                              {"ANTHROPIC_BASE_URL": standin.url, "ANTHROPIC_API_KEY": "sk-ant-dummy"})
        procs.append(worker)
        empty = tmp_path / "no-fake-pids"
        empty.mkdir(exist_ok=True)
        client = Client(base, make_cookie(USER))
        clients.append(client)
        return E2E(s, standin, client, worker, rconn, real_claude_bin, empty, timings)

    yield start
    for client in clients:
        client.close()


@pytest.fixture
def e2e(start_e2e: Callable[..., E2E]) -> E2E:
    return start_e2e()


# --- reading the stand-in's requests ------------------------------------------------------------------------------


def _texts(content: Any) -> str:
    if isinstance(content, str):
        return content
    blocks = [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []
    return "".join(str(b.get("text", "")) for b in blocks
                   if b.get("type") == "text" and not str(b.get("text", "")).lstrip().startswith("<system-reminder>"))


def conversation(request: RecordedRequest) -> list[tuple[str, str]]:
    """(role, text) of the request's user and assistant messages (the CLI also puts `system` entries there)."""
    return [(m["role"], _texts(m.get("content"))) for m in request.messages if m.get("role") in ("user", "assistant")]


def tool_results(request: RecordedRequest) -> list[dict[str, Any]]:
    last = request.messages[-1]
    content = last.get("content")
    return [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"] if isinstance(
        content, list) else []


def transcript_lines(e: E2E, session_id: str) -> list[dict[str, Any]]:
    """The session's transcript as the CLI wrote it ([] before it exists); a half-written last line is skipped."""
    path = transcript_path(e.settings.claude_config_dir, e.settings.claude_cwd, session_id)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    lines = []
    for raw in text.splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


def prompts(e: E2E, session_id: str) -> list[str]:
    """The user prompts in the transcript (string content; tool results and meta lines are lists)."""
    return [line["message"]["content"] for line in transcript_lines(e, session_id)
            if line.get("type") == "user" and isinstance(line.get("message", {}).get("content"), str)]


# --- 1. two turns -------------------------------------------------------------------------------------------------


def test_second_turn_resumes_the_real_transcript_and_history_shows_both_turns(e2e: E2E) -> None:
    session = e2e.client.new_session()
    assert e2e.client.history(session) == []
    e2e.standin.push("text", text="Nice to meet you, Alice.")
    first = e2e.ask_timed(session, "My name is Alice.", "first turn (--session-id)")
    assert first["status"] == "finished", first
    assert first["result"]["result"] == "Nice to meet you, Alice."
    assert first["result"]["session_id"] == session and first["result"]["is_error"] is False
    assert first["result"]["num_turns"] == 1 and first["result"]["denied_tools"] == []

    # A short delay lets the test read the second run's command line from /proc while it runs.
    e2e.standin.push("slow", text="Your name is Alice.", delay=1.0)
    job_id = e2e.client.ask(session, "What is my name?")
    running = e2e.wait_cli()
    flags = running.argv[1:running.argv.index("--")]
    assert flags[flags.index("--resume") + 1] == session and "--session-id" not in flags, running.argv
    assert running.argv[-2:] == ["--", "What is my name?"]
    second = e2e.client.wait_done(job_id)
    assert second["status"] == "finished", second
    assert second["result"]["result"] == "Your name is Alice." and second["result"]["session_id"] == session

    # The model saw the first turn in the second request: that is what --resume is for.
    requests = e2e.standin.message_requests
    assert len(requests) == 2
    assert conversation(requests[0]) == [("user", "My name is Alice.")]
    assert conversation(requests[1]) == [
        ("user", "My name is Alice."), ("assistant", "Nice to meet you, Alice."), ("user", "What is my name?"),
    ]

    # History comes from the CLI's own transcript (written by the pinned version), one file for both turns.
    lines = transcript_lines(e2e, session)
    assert {line.get("version") for line in lines if line.get("type") == "user"} == {PINNED}
    history = e2e.client.history(session)
    assert [(m["role"], m["text"]) for m in history] == [
        ("user", "My name is Alice."), ("assistant", "Nice to meet you, Alice."),
        ("user", "What is my name?"), ("assistant", "Your name is Alice."),
    ]
    assert [m["role"] for m in history] == ["user", "assistant"] * 2
    assert all(m["timestamp"] for m in history)
    path = transcript_path(e2e.settings.claude_config_dir, e2e.settings.claude_cwd, session)
    assert history == read_history(path)

    for body in (first, second):
        assert terminal_events(e2e.settings.audit_log, body["job_id"]) == ["ask_ok"]
    e2e.assert_clean(session)


# --- 2. API errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "says"),
    [
        (500, ["API Error: 500 ", "Internal server error (stub)"]),
        (529, ["API Error: 529 Overloaded", "Overloaded (stub)"]),
        (401, ["Invalid API key", "Fix external API key"]),
    ],
)
def test_api_error_fails_the_job_fast_with_the_clis_message_and_frees_the_lease(
    e2e: E2E, status: int, says: list[str]
) -> None:
    session = e2e.client.new_session()
    e2e.standin.push("error", status=status)  # with x-should-retry: false
    t0 = time.monotonic()
    body = e2e.client.wait_done(e2e.client.ask(session, "hello"), 15)
    elapsed = time.monotonic() - t0
    assert elapsed < 15, elapsed
    assert body["status"] == "failed", body
    assert body["error"]["code"] == "claude_error", body["error"]
    message = body["error"]["message"]
    assert all(fragment in message for fragment in says), message
    assert "Traceback" not in message and "exit 1" not in message
    assert "127.0.0.1" not in message, "the gateway's internal address is not shown to users"
    assert len(e2e.standin.message_requests) == 1, "no retries (CLAUDE_CODE_MAX_RETRIES=0, x-should-retry: false)"
    assert terminal_events(e2e.settings.audit_log, body["job_id"]) == ["ask_error"]
    e2e.assert_clean(session)
    # The conversation stays usable; history shows the failed prompt without a reply (the CLI's error line is
    # synthetic and left out).
    e2e.standin.push("text", text="Back again.")
    after = e2e.client.wait_done(e2e.client.ask(session, "and now?"))
    assert after["status"] == "finished" and after["result"]["result"] == "Back again.", after
    assert [(m["role"], m["text"]) for m in e2e.client.history(session)] == [
        ("user", "hello"), ("user", "and now?"), ("assistant", "Back again."),
    ]


# --- 3. tool use refused ------------------------------------------------------------------------------------------


def _push_touch(e: E2E) -> Path:
    marker = e.settings.claude_cwd / "marker"
    e.standin.push("tool_use", tool_input={"command": f"touch {marker}", "description": "make a marker"})
    return marker


def test_tool_call_without_configured_tools_is_refused_and_the_reply_says_so(e2e: E2E) -> None:
    session = e2e.client.new_session()
    marker = _push_touch(e2e)
    body = e2e.client.wait_done(e2e.client.ask(session, "run something"))
    assert body["status"] == "finished", body
    result = body["result"]
    # With `--tools ""` the CLI has no Bash at all: it answers "No such tool", which is not a permission denial.
    assert result["denied_tools"] == [] and result["num_turns"] == 2
    assert "No such tool available: Bash" in result["result"]
    followup = e2e.standin.message_requests[-1]
    assert [r["is_error"] for r in tool_results(followup)] == [True]
    assert not marker.exists(), "the command did not run"
    assert terminal_events(e2e.settings.audit_log, body["job_id"]) == ["ask_ok"]
    e2e.assert_clean(session)


def test_tool_call_denied_by_dont_ask_mode_is_reported_in_denied_tools(start_e2e: Callable[..., E2E]) -> None:
    e2e = start_e2e(claude_tools="Bash", claude_permission_mode="dontAsk", claude_allowed_tools=[])
    session = e2e.client.new_session()
    marker = _push_touch(e2e)
    body = e2e.client.wait_done(e2e.client.ask(session, "run something"))
    assert body["status"] == "finished", body
    result = body["result"]
    assert result["denied_tools"] == ["Bash"] and result["num_turns"] == 2
    assert "denied because Claude Code is running in don't ask mode" in result["result"]
    assert not marker.exists(), "the command did not run"
    assert e2e.audit_ok(body["job_id"])["denied_tools"] == ["Bash"]
    e2e.assert_clean(session)


# --- 4. stopped mid-turn ------------------------------------------------------------------------------------------


def test_delete_stops_a_running_turn_kills_its_cli_and_the_next_turn_carries_the_earlier_ones(e2e: E2E) -> None:
    session = e2e.client.new_session()
    e2e.standin.push("text", text="First answer.")
    assert e2e.client.wait_done(e2e.client.ask(session, "Hello."))["status"] == "finished"

    e2e.standin.set_mode("slow", text="never sent", delay=20)
    job_id = e2e.client.ask(session, "Tell me a long story.")
    running = e2e.wait_cli()
    e2e.standin.wait_for_requests(2, timeout=15)
    wait_until(lambda: "Tell me a long story." in prompts(e2e, session), 10, what="the prompt in the transcript")
    assert e2e.client.job(job_id)["status"] == "started"

    t0 = time.monotonic()
    reply = e2e.client.http.delete(f"/agent/jobs/{job_id}")
    assert reply.status_code == 200, reply.text
    assert reply.json()["status"] == "canceled" and reply.json()["error"]["code"] == "canceled", reply.json()
    wait_until(lambda: not Path(f"/proc/{running.pid}/cmdline").exists()
               or not Path(f"/proc/{running.pid}/cmdline").read_bytes(), 5, 0.02, "the claude process to die")
    stop_s = time.monotonic() - t0
    assert stop_s < 10, stop_s
    assert e2e.client.job(job_id)["status"] == "canceled"
    assert terminal_events(e2e.settings.audit_log, job_id) == ["canceled"]
    e2e.assert_clean(session)

    e2e.standin.set_mode("text")
    e2e.standin.push("text", text="Third answer.")
    third = e2e.client.wait_done(e2e.client.ask(session, "Are you still there?"))
    assert third["status"] == "finished" and third["result"]["result"] == "Third answer.", third
    # The real CLI answers the unanswered prompt with a synthetic "No response requested." when it resumes.
    assert conversation(e2e.standin.message_requests[-1]) == [
        ("user", "Hello."), ("assistant", "First answer."),
        ("user", "Tell me a long story."), ("assistant", "No response requested."),
        ("user", "Are you still there?"),
    ]
    # History leaves the synthetic line out: the interrupted prompt stays, without a reply.
    assert [(m["role"], m["text"]) for m in e2e.client.history(session)] == [
        ("user", "Hello."), ("assistant", "First answer."), ("user", "Tell me a long story."),
        ("user", "Are you still there?"), ("assistant", "Third answer."),
    ]
    e2e.assert_clean(session)


# --- 5. progress while it runs ------------------------------------------------------------------------------------


def test_slow_single_reply_shows_started_and_no_progress_until_it_ends(e2e: E2E) -> None:
    """The real CLI's stream-json emits an assistant event per finished content block (no partial messages),
    so a reply of one text block gives no progress before the end, however slowly it streams."""
    session = e2e.client.new_session()
    e2e.standin.set_mode("slow", text="A slow but complete answer.", delay=1.0, delay_within=0.6)
    job_id = e2e.client.ask(session, "take your time")
    e2e.standin.wait_for_requests(1, timeout=15)
    seen = []
    deadline = time.monotonic() + 1.5  # the reply's deltas take about 1.8 s after the 1 s delay
    while time.monotonic() < deadline:
        body = e2e.client.job(job_id)
        seen.append((body["status"], body.get("progress")))
        time.sleep(0.1)
    assert seen and all(s == ("started", NO_PROGRESS) for s in seen), seen
    done = e2e.client.wait_done(job_id)
    assert done["status"] == "finished" and done["result"]["result"] == "A slow but complete answer."
    e2e.assert_clean(session)


def test_progress_shows_the_tool_call_while_the_follow_up_request_is_slow(e2e: E2E) -> None:
    session = e2e.client.new_session()
    marker = _push_touch(e2e)
    e2e.standin.set_mode("slow", delay=2.5)  # the follow-up request carrying the tool result
    job_id = e2e.client.ask(session, "use a tool")
    body = wait_until(lambda: (b := e2e.client.job(job_id)).get("progress", {}).get("turns") and b, 15, 0.05,
                      "progress with a turn")
    assert body["status"] == "started"
    assert body["progress"]["turns"] == 1 and body["progress"]["tool"] == "Bash" and body["progress"]["updated_at"]
    assert len(e2e.standin.message_requests) <= 2  # still in the (slow) follow-up, not done
    done = e2e.client.wait_done(job_id)
    assert done["status"] == "finished" and done["result"]["num_turns"] == 2, done
    assert not marker.exists()
    e2e.assert_clean(session)


# --- the worker's other classifications, against the real CLI ---------------------------------------------------


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def test_claude_past_the_wall_clock_is_killed_with_its_process_group_and_the_job_times_out(
    start_e2e: Callable[..., E2E],
) -> None:
    e2e = start_e2e(job_timeout_s=3)
    session = e2e.client.new_session()
    e2e.standin.set_mode("slow", delay=30)
    t0 = time.monotonic()
    job_id = e2e.client.ask(session, "never answered in time")
    running = e2e.wait_cli()
    assert _group_members(running.pid), "claude leads its own process group"
    body = e2e.client.wait_done(job_id, 20)
    assert body["status"] == "failed" and body["error"] == {"code": "timeout", "message": "claude timed out after 3 s"}
    assert time.monotonic() - t0 < 10
    assert not _group_members(running.pid), "nothing claude started is left"
    assert terminal_events(e2e.settings.audit_log, job_id) == ["ask_error"]
    e2e.assert_clean(session)


def test_agent_that_keeps_calling_tools_past_max_turns_fails_as_max_turns(start_e2e: Callable[..., E2E]) -> None:
    e2e = start_e2e(claude_tools="Bash", claude_allowed_tools=["Bash"], claude_max_turns=1)
    session = e2e.client.new_session()
    e2e.standin.set_mode("tool_use", tool_input={"command": "true", "description": "do nothing"})
    body = e2e.client.wait_done(e2e.client.ask(session, "loop forever"))
    assert body["status"] == "failed", body
    assert body["error"] == {"code": "max_turns", "message": "the agent used all 1 turns without finishing"}
    assert terminal_events(e2e.settings.audit_log, body["job_id"]) == ["ask_error"]
    e2e.assert_clean(session)


# --- timing ---------------------------------------------------------------------------------------------------------


def test_one_ask_end_to_end_is_mostly_the_cli_run_not_queueing(e2e: E2E) -> None:
    session = e2e.client.new_session()
    bodies = [e2e.ask_timed(session, f"question {n}", f"turn {n} ({'--session-id' if n == 1 else '--resume'})")
              for n in (1, 2, 3)]
    assert all(b["status"] == "finished" for b in bodies), bodies
    for timing in e2e.timings.asks[-3:]:
        assert timing.queue_s < 1.0, timing  # a forking worker picks a job up in tens of ms
        assert timing.claude_s < timing.process_s <= timing.run_s <= timing.total_s, timing
    e2e.assert_clean(session)


def test_audit_reports_the_cli_process_wall_time_not_only_the_clis_own_duration(e2e: E2E) -> None:
    """The real CLI's `duration_ms` leaves out its start-up (about half a second of a 0.6-1.4 s process), so the
    worker measures the process itself: `subprocess_ms` is that wall time, `cli_duration_ms` the CLI's number."""
    session = e2e.client.new_session()
    t0 = time.monotonic()
    body = e2e.client.wait_done(e2e.client.ask(session, "hello"))
    elapsed_ms = (time.monotonic() - t0) * 1000
    assert body["status"] == "finished", body
    line = e2e.audit_ok(body["job_id"])
    assert line["cli_duration_ms"] == body["result"]["duration_ms"]
    assert line["cli_duration_ms"] < line["subprocess_ms"] <= line["run_ms"] <= elapsed_ms, line
    assert line["subprocess_ms"] - line["cli_duration_ms"] >= 100, "the CLI's start-up is not in its duration_ms"
