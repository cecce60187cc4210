"""Run the claude CLI for one turn: fixed flags, minimal env, wall clock, no orphan, classified outcome."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import JobFailed
from shared.settings import Settings
from shared.transcript import transcript_path

PR_SET_PDEATHSIG = 1
STDERR_PREVIEW_CHARS = 300
UNKNOWN_SESSION = "No conversation found with session ID"
SESSION_IN_USE = "is already in use"
# The CLI names the API gateway's address in some errors: users need not see internal hosts.
GATEWAY_HINT = re.compile(r"\s*If it persists, check your inference gateway \([^)]*\)\.?")


def die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the work-horse that started it dies, even by SIGKILL."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn_options(cmd: list[str], path: str) -> tuple[list[str], dict[str, Any]]:
    """How to start claude so that it dies with the work-horse.

    util-linux's `setpriv --pdeathsig KILL` sets the same PR_SET_PDEATHSIG as `die_with_parent` and then
    execs claude (the setting survives exec). Any `preexec_fn` makes subprocess fork the whole horse
    instead of vfork-ing: 5.3 ms per start against 0.3 ms through setpriv (bench/RESULTS.md, Components).
    Without setpriv on the host, fall back to `preexec_fn`.
    """
    setpriv = shutil.which("setpriv", path=path)
    if setpriv:
        return [setpriv, "--pdeathsig", "KILL", "--", *cmd], {}
    return cmd, {"preexec_fn": die_with_parent}


def build_env(settings: Settings, tmpdir: Path) -> dict[str, str]:
    """Only what the CLI needs: no API or session secrets of ours leak into it."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(settings.claude_config_dir),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "CLAUDE_CONFIG_DIR": str(settings.claude_config_dir),
        "CLAUDE_CODE_TMPDIR": str(tmpdir),
        "TMPDIR": str(tmpdir),
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_MAX_RETRIES": str(settings.claude_max_retries),
    }
    for name in settings.claude_env_passthrough:
        if name in os.environ and not name.startswith("AGENT_"):
            env[name] = os.environ[name]
    return env


def build_command(settings: Settings, session_id: str, message: str, *, resume: bool) -> list[str]:
    s = settings
    cmd = [s.claude_bin, "-p"]
    cmd += ["--output-format", "stream-json", "--verbose"] if s.claude_stream_progress else ["--output-format", "json"]
    cmd += ["--max-turns", str(s.claude_max_turns), "--permission-mode", s.claude_permission_mode]
    cmd += ["--strict-mcp-config", "--setting-sources", "", "--tools", s.claude_tools]
    if s.claude_model:
        cmd += ["--model", s.claude_model]
    if s.claude_allowed_tools:
        cmd += ["--allowedTools", ",".join(s.claude_allowed_tools)]
    if s.claude_append_system_prompt:
        cmd += ["--append-system-prompt", s.claude_append_system_prompt]
    cmd += ["--resume" if resume else "--session-id", session_id, "--", message]
    return cmd


@dataclass
class Progress:
    """Turns so far and the tool in use, read from the stream-json events as they arrive."""

    turns: int = 0
    tool: str | None = None
    _ids: set[str] = field(default_factory=set)

    def feed(self, event: dict[str, Any]) -> bool:
        if event.get("type") != "assistant" or not isinstance(event.get("message"), dict):
            return False
        message = event["message"]
        before = (self.turns, self.tool)
        message_id = message.get("id")
        if isinstance(message_id, str) and message_id not in self._ids:
            self._ids.add(message_id)
            self.turns = len(self._ids)
        blocks = [b for b in message.get("content") or [] if isinstance(b, dict)]
        tools = [b.get("name") for b in blocks if b.get("type") == "tool_use"]
        if tools:
            self.tool = str(tools[-1])
        elif any(b.get("type") == "text" for b in blocks):
            self.tool = None
        return (self.turns, self.tool) != before

    def as_meta(self) -> dict[str, Any]:
        updated_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return {"turns": self.turns, "tool": self.tool, "updated_at": updated_at}


@dataclass
class Run:
    """One finished CLI process: exit code, raw output, and the result object if it printed one."""

    returncode: int
    stdout: bytes
    stderr: bytes
    result: dict[str, Any] | None

    @property
    def stderr_line(self) -> str:
        lines = [ln.strip() for ln in self.stderr.decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:STDERR_PREVIEW_CHARS] if lines else ""


class ClaudeRunner:
    """Runs one turn. `tick` is called every few seconds while claude runs (lease renewal); `on_progress`
    whenever the turn count or the tool in use changes."""

    def __init__(self, settings: Settings, job_id: str, tick: Callable[[], None],
                 on_progress: Callable[[dict[str, Any]], None]) -> None:
        self.settings = settings
        self.tick = tick
        self.on_progress = on_progress
        self.tmpdir = settings.claude_tmpdir or settings.claude_config_dir / "tmp"
        self.job_dir = self.tmpdir / "jobs" / job_id
        # Wall time of this turn's CLI process(es), start-up included: the CLI's own `duration_ms` leaves out
        # its start-up (measured with 2.1.332: duration_ms 110-330 ms for processes that lived 0.6-1.4 s).
        self.wall_ms = 0

    def run_turn(self, session_id: str, message: str) -> dict[str, Any]:
        """Run the turn; return the result fields of the contract or raise JobFailed."""
        s = self.settings
        path = transcript_path(s.claude_config_dir, s.claude_cwd, session_id)
        resume = path.is_file()
        self.job_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + s.job_timeout_s
        try:
            run = self._spawn(build_command(s, session_id, message, resume=resume), deadline)
            if run.result is None and (UNKNOWN_SESSION in run.stderr_line or SESSION_IN_USE in run.stderr_line):
                # The transcript on disk disagreed with the CLI's view (moved or written meanwhile): flip once.
                resume = not resume
                run = self._spawn(build_command(s, session_id, message, resume=resume), deadline)
                if run.result is None and (UNKNOWN_SESSION in run.stderr_line or SESSION_IN_USE in run.stderr_line):
                    raise JobFailed("session_conflict", f"claude could not open this conversation: {run.stderr_line}")
        finally:
            shutil.rmtree(self.job_dir, ignore_errors=True)
        return classify(run, s)

    def _spawn(self, cmd: list[str], deadline: float) -> Run:
        s = self.settings
        s.claude_cwd.mkdir(parents=True, exist_ok=True)
        out_path, err_path = self.job_dir / "stdout", self.job_dir / "stderr"
        started = time.monotonic()
        env = build_env(s, self.tmpdir)
        binary = shutil.which(cmd[0], path=env["PATH"])
        if binary is None:
            raise JobFailed("claude_error", f"the claude executable ({cmd[0]}) is not installed on this worker; "
                                            "tell the operator")
        argv, options = spawn_options([binary, *cmd[1:]], env["PATH"])
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=s.claude_cwd,
                env=env, start_new_session=True, **options,
            )
        try:
            self._supervise(proc, out_path, deadline)
        finally:
            kill_group(proc)
            self.wall_ms += int((time.monotonic() - started) * 1000)
        stdout = out_path.read_bytes()[: s.claude_output_max_bytes + 1]
        stderr = err_path.read_bytes()[-64 * 1024:]
        if len(stdout) > s.claude_output_max_bytes:
            raise JobFailed("bad_output", f"claude printed more than {s.claude_output_max_bytes} bytes")
        return Run(proc.returncode, stdout, stderr, parse_result(stdout))

    def _supervise(self, proc: subprocess.Popen[bytes], out_path: Path, deadline: float) -> None:
        s = self.settings
        progress, offset, pending = Progress(), 0, b""
        tick_every = max(1.0, s.lease_ttl_s / 3)
        next_tick = time.monotonic() + tick_every
        pidfd = os.pidfd_open(proc.pid)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while True:
                exited = bool(poller.poll(250))
                if s.claude_stream_progress:
                    offset, pending = self._read_progress(out_path, offset, pending, progress)
                if exited:
                    proc.wait()
                    return
                now = time.monotonic()
                if out_path.stat().st_size > s.claude_output_max_bytes:
                    raise JobFailed("bad_output", f"claude printed more than {s.claude_output_max_bytes} bytes")
                if now >= deadline:
                    raise JobFailed("timeout", f"claude timed out after {s.job_timeout_s} s")
                if now >= next_tick:
                    self.tick()
                    next_tick = now + tick_every
        finally:
            os.close(pidfd)

    def _read_progress(self, path: Path, offset: int, pending: bytes, progress: Progress) -> tuple[int, bytes]:
        with path.open("rb") as handle:
            handle.seek(offset)
            chunk = handle.read(1024 * 1024)
        offset += len(chunk)
        *lines, pending = (pending + chunk).split(b"\n")
        changed = False
        for line in lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                changed = (isinstance(event, dict) and progress.feed(event)) or changed
        if changed:
            self.on_progress(progress.as_meta())
        return offset, pending


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill claude and everything it started (its own process group); reap it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def parse_result(stdout: bytes) -> dict[str, Any] | None:
    """The result object: the one JSON line of `json` output, or the last `result` event of stream-json."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            return None
        if isinstance(obj, dict) and obj.get("type") == "result":
            return obj
        if not isinstance(obj, dict):
            return None
    return None


def classify(run: Run, settings: Settings) -> dict[str, Any]:
    """Success needs exit 0 and `is_error: false`; everything else becomes a JobFailed a person can act on."""
    res = run.result
    if res is None:
        if run.returncode < 0:
            raise JobFailed("claude_error", f"claude was killed by signal {-run.returncode}")
        if run.returncode != 0:
            detail = run.stderr_line or "no output"
            raise JobFailed("claude_error", f"claude failed (exit {run.returncode}): {detail}")
        if not run.stdout.strip():
            raise JobFailed("bad_output", "claude exited without printing a result")
        raise JobFailed("bad_output", "claude printed output that is not a result")
    subtype = res.get("subtype")
    if subtype == "error_max_turns":
        raise JobFailed("max_turns", f"the agent used all {settings.claude_max_turns} turns without finishing")
    if run.returncode != 0 or res.get("is_error") or subtype != "success":
        errors = res.get("errors")
        text = res.get("result") if isinstance(res.get("result"), str) else None
        message = text or ("; ".join(map(str, errors)) if isinstance(errors, list) and errors else None)
        message = GATEWAY_HINT.sub("", message or "") or f"claude reported {subtype or 'an error'}"
        raise JobFailed("claude_error", message[:500])
    if not isinstance(res.get("result"), str):
        raise JobFailed("bad_output", "claude's result has no text")
    denials = res.get("permission_denials")
    denied = [str(d.get("tool_name")) for d in denials if isinstance(d, dict)] if isinstance(denials, list) else []
    return {
        "result": res["result"],
        "session_id": str(res.get("session_id") or ""),
        "duration_ms": int(res.get("duration_ms") or 0),
        "num_turns": int(res.get("num_turns") or 0),
        "is_error": False,
        "denied_tools": denied,
    }
