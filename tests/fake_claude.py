#!/usr/bin/env python3
"""A stand-in for the ``claude`` CLI (print mode) for the worker's tests. Stdlib only.

It honours the contract of the real CLI (pinned in ``claude-cli.version``) as recorded in
``/work/shared/reference/claude-cli`` and checked by ``tests/test_real_cli_contract.py``:

- options ``-p/--print``, ``--output-format text|json|stream-json`` (stream-json needs ``--verbose``),
  ``--verbose``, ``--model``, ``--tools``/``--allowedTools``/``--disallowedTools`` (variadic: they swallow
  the following non-option words), ``--permission-mode``, ``--max-turns``, ``--strict-mcp-config``,
  ``--setting-sources``, ``--append-system-prompt``, ``--system-prompt``, ``--session-id <uuid>``,
  ``-r/--resume <uuid>``, ``--fork-session``, ``-v/--version``; the prompt is the first word after ``--``
  (or the first positional word), and stdin is read and appended after a newline; no prompt and no stdin
  fails; an open idle stdin costs 3 s and a warning, like the real one;
- the transcript at ``$CLAUDE_CONFIG_DIR/projects/<physical cwd, every char outside [a-zA-Z0-9] -> '-'>/
  <session>.jsonl`` (mode 0600): queue-operation lines, ``user`` lines (string content), an ``attachment``
  line, ``assistant`` lines (content list), ``last-prompt``, ``cost-state``; lines chain by
  ``uuid``/``parentUuid``; a resume after an unanswered prompt inserts the synthetic
  "No response requested." assistant line; ``--resume`` finds the session in any project directory and
  appends to that file, ``--session-id`` only refuses an id already used in the current project;
- the failures before any API call (empty stdout, one stderr line, exit 1) with the real messages;
- the result object (one line) with the real fields; API errors exit 1 with ``subtype: "success"`` and
  ``is_error: true``; SIGTERM exits 143 with empty stdout (json) after writing ``last-prompt``.

Directives in the prompt drive it (several may be combined):

``[[sleep S]]``       sleep S seconds before answering (stream-json: a Bash ``tool_use`` event first)
``[[hang]]``          sleep forever (signals still work: SIGTERM -> exit 143)
``[[api-error N]]``   an API error with status N, like the real one (exit 1, is_error true)
``[[garbage]]``       print non-JSON, exit 0
``[[empty]]``         print nothing, exit 0
``[[exit N]]``        exit N with a line on stderr
``[[big N]]``         a result of exactly N bytes (UTF-8)
``[[max-turns]]``     subtype error_max_turns, exit 1, ``errors`` list, no ``result``
``[[tool NAME]]``     one tool round trip (num_turns 2), subject to --tools/--allowedTools/--permission-mode

Default reply: ``FAKE REPLY #<turn number in this session> to: <prompt>``.

Test hooks: ``$FAKE_CLAUDE_PIDFILE_DIR/<pid>`` exists while it runs (removed on every exit but SIGKILL);
``$FAKE_CLAUDE_LOG`` gets one JSON line per run with argv, env keys, cwd, pid and the kind of stdin.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import stat
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

# --- constants -----------------------------------------------------------------------------------------------


def _pinned_version() -> str:
    try:
        return (Path(__file__).resolve().parent.parent / "claude-cli.version").read_text().strip() or "2.1.332"
    except OSError:
        return "2.1.332"


VERSION = _pinned_version()
DEFAULT_MODEL = "claude-opus-5-5"
COST_PER_CALL = 0.00028
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
DIRECTIVE_RE = re.compile(r"\[\[\s*([a-z][a-z-]*)(?:\s+([^\]]*?))?\s*\]\]")
PERMISSION_MODES = ("acceptEdits", "auto", "bypassPermissions", "manual", "dontAsk", "plan")
OUTPUT_FORMATS = ("text", "json", "stream-json")
DEFAULT_TOOLS = ["Task", "Bash", "Edit", "Glob", "Grep", "Read", "WebFetch", "WebSearch", "Write"]
STDIN_WAIT_S = 3.0

# name -> (flag spec as commander prints it, kind): kind is "flag", "value", "variadic" or "optional".
OPTIONS: dict[str, tuple[str, str]] = {
    "print": ("-p, --print", "flag"),
    "verbose": ("--verbose", "flag"),
    "output-format": ("--output-format <format>", "value"),
    "input-format": ("--input-format <format>", "value"),
    "model": ("--model <model>", "value"),
    "fallback-model": ("--fallback-model <model>", "value"),
    "tools": ("--tools <tools...>", "variadic"),
    "allowedTools": ("--allowedTools, --allowed-tools <tools...>", "variadic"),
    "disallowedTools": ("--disallowedTools, --disallowed-tools <tools...>", "variadic"),
    "add-dir": ("--add-dir <directories...>", "variadic"),
    "mcp-config": ("--mcp-config <configs...>", "variadic"),
    "permission-mode": ("--permission-mode <mode>", "value"),
    "max-turns": ("--max-turns <turns>", "value"),
    "max-budget-usd": ("--max-budget-usd <amount>", "value"),
    "strict-mcp-config": ("--strict-mcp-config", "flag"),
    "setting-sources": ("--setting-sources <sources>", "value"),
    "settings": ("--settings <file-or-json>", "value"),
    "append-system-prompt": ("--append-system-prompt <prompt>", "value"),
    "system-prompt": ("--system-prompt <prompt>", "value"),
    "session-id": ("--session-id <uuid>", "value"),
    "resume": ("-r, --resume [value]", "optional"),
    "continue": ("-c, --continue", "flag"),
    "fork-session": ("--fork-session", "flag"),
    "no-session-persistence": ("--no-session-persistence", "flag"),
    "include-partial-messages": ("--include-partial-messages", "flag"),
    "effort": ("--effort <level>", "value"),
    "bare": ("--bare", "flag"),
    "dangerously-skip-permissions": ("--dangerously-skip-permissions", "flag"),
    "version": ("-v, --version", "flag"),
}
ALIASES = {
    "-p": "print",
    "-r": "resume",
    "-c": "continue",
    "-v": "version",
    "--allowed-tools": "allowedTools",
    "--disallowed-tools": "disallowedTools",
}

# --- small helpers -------------------------------------------------------------------------------------------


def now_iso() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def new_uuid() -> str:
    return str(uuid.uuid4())


def fail(message: str, code: int = 1) -> NoReturn:
    """A failure before any API call: nothing on stdout, one line on stderr."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    raise SystemExit(code)


def java_hash_b36(text: str) -> str:
    """abs(Java String.hashCode over UTF-16 units) in base 36, as the CLI appends to long project names."""
    h = 0
    data = text.encode("utf-16-le", "surrogatepass")
    for i in range(0, len(data), 2):
        h = (h * 31 + int.from_bytes(data[i : i + 2], "little")) & 0xFFFFFFFF
    if h >= 2**31:
        h -= 2**32
    n = abs(h)
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def encode_project_dir(cwd: str) -> str:
    """Every UTF-16 unit outside [a-zA-Z0-9] becomes '-'; past 200 chars: cut + '-' + base36 hash."""
    enc = "".join(c if (c.isascii() and c.isalnum()) else ("--" if ord(c) > 0xFFFF else "-") for c in cwd)
    if len(enc) <= 200:
        return enc
    return enc[:200] + "-" + java_hash_b36(cwd)


def split_tools(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    names: list[str] = []
    for v in values:
        names.extend(p for p in re.split(r"[,\s]+", v) if p)
    return names


# --- command line --------------------------------------------------------------------------------------------


class Args:
    def __init__(self) -> None:
        self.opts: dict[str, Any] = {}
        self.positionals: list[str] = []
        self.swallowed: list[tuple[str, str]] = []  # (option, value) a variadic option took

    def get(self, name: str, default: Any = None) -> Any:
        return self.opts.get(name, default)


def parse_args(argv: list[str]) -> Args:
    args = Args()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            args.positionals.extend(argv[i:])
            break
        if not arg.startswith("-") or arg == "-":
            args.positionals.append(arg)
            continue
        inline: str | None = None
        if arg.startswith("--") and "=" in arg:
            arg, inline = arg.split("=", 1)
        name = ALIASES.get(arg, arg[2:] if arg.startswith("--") else None)
        if name is None or name not in OPTIONS:
            fail(f"error: unknown option '{arg}'")
        spec, kind = OPTIONS[name]
        if kind == "flag":
            args.opts[name] = True
        elif kind == "value":
            if inline is not None:
                args.opts[name] = inline
            elif i < len(argv) and not (argv[i].startswith("-") and argv[i] != "-" and argv[i] != ""):
                args.opts[name] = argv[i]
                i += 1
            else:
                fail(f"error: option '{spec}' argument missing")
        elif kind == "optional":
            if inline is not None:
                args.opts[name] = inline
            elif i < len(argv) and not argv[i].startswith("-"):
                args.opts[name] = argv[i]
                i += 1
            else:
                args.opts[name] = True
        else:  # variadic: everything up to the next option
            values: list[str] = [inline] if inline is not None else []
            while i < len(argv) and not (argv[i].startswith("-") and argv[i] != ""):
                values.append(argv[i])
                i += 1
            if not values:
                fail(f"error: option '{spec}' argument missing")
            args.opts.setdefault(name, []).extend(values)
            args.swallowed.extend((arg, v) for v in values)
    return args


def validate(args: Args) -> None:
    fmt = args.get("output-format", "text")
    if fmt not in OUTPUT_FORMATS:
        fail(
            f"error: option '--output-format <format>' argument '{fmt}' is invalid. "
            f"Allowed choices are {', '.join(OUTPUT_FORMATS)}."
        )
    mode = args.get("permission-mode")
    if mode is not None and mode not in PERMISSION_MODES:
        fail(
            f"error: option '--permission-mode <mode>' argument '{mode}' is invalid. "
            f"Allowed choices are {', '.join(PERMISSION_MODES)}."
        )
    turns = args.get("max-turns")
    if turns is not None:
        try:
            float(turns)
        except ValueError:
            fail(f"error: option '--max-turns <turns>' argument '{turns}' is invalid. must be a number")
    if args.get("dangerously-skip-permissions") and hasattr(os, "geteuid") and os.geteuid() == 0:
        fail("--dangerously-skip-permissions cannot be used with root/sudo privileges for security reasons")
    if fmt == "stream-json" and not args.get("verbose"):
        fail("Error: When using --print, --output-format=stream-json requires --verbose")
    session_id = args.get("session-id")
    resume = args.get("resume")
    if session_id is not None and (resume is not None or args.get("continue")) and not args.get("fork-session"):
        fail("Error: --session-id with --continue or --resume also needs --fork-session.")
    if session_id is not None and not UUID_RE.match(session_id):
        fail("Error: Invalid session ID. Must be a valid UUID.")
    if resume is not None and (resume is True or not UUID_RE.match(str(resume))):
        value = "" if resume is True else str(resume)
        fail(
            "Error: --resume requires a valid session ID or session title when used with --print. "
            f'Usage: claude -p --resume <session-id|title>. Provided value "{value}" is not a UUID and does not '
            "match any session title."
        )


def read_prompt(args: Args) -> str:
    prompt = args.positionals[0] if args.positionals else None
    extra = read_stdin(wait=prompt is not None)
    if prompt is not None and extra:
        return prompt + "\n" + extra
    if prompt is not None:
        return prompt
    if extra:
        return extra
    for opt, value in args.swallowed:
        if re.search(r"\s", value):
            sys.stderr.write(
                f'"{value}" was read as a value of {opt}, not as a prompt · put a prompt before {opt} or after --\n'
            )
            break
    fail("Error: Input must be provided either through stdin or as a prompt argument when using --print")


def stdin_kind() -> str:
    try:
        st = os.fstat(0)
    except OSError:
        return "closed"
    if stat.S_ISCHR(st.st_mode):
        return "tty" if os.isatty(0) else "devnull"
    if stat.S_ISFIFO(st.st_mode):
        return "pipe"
    if stat.S_ISSOCK(st.st_mode):
        return "socket"
    return "file"


def read_stdin(wait: bool) -> str:
    kind = stdin_kind()
    if kind in ("closed", "tty", "devnull"):
        return ""
    if kind in ("pipe", "socket"):
        ready, _, _ = select.select([0], [], [], STDIN_WAIT_S)
        if not ready:
            sys.stderr.write(
                "Warning: no stdin data received in 3s, proceeding without it. If piping from a slow command, "
                "redirect stdin explicitly: < /dev/null to skip, or wait longer.\n"
            )
            return ""
    data = sys.stdin.buffer.read()
    return data.decode("utf-8", "replace")


# --- transcript ----------------------------------------------------------------------------------------------


class Transcript:
    def __init__(self, path: Path, session_id: str, cwd: str, model: str, permission_mode: str) -> None:
        self.path = path
        self.session_id = session_id
        self.cwd = cwd
        self.model = model
        self.permission_mode = permission_mode
        self.leaf: str | None = None
        self.user_turns = 0
        self.total_cost = 0.0
        self.last_prompt: str | None = None
        self.leaf_is_unanswered_prompt = False
        if path.exists():
            self._load()

    def _load(self) -> None:
        with self.path.open(encoding="utf-8") as fh:
            for raw in fh:
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(line, dict):
                    continue
                kind = line.get("type")
                if kind == "cost-state" and isinstance(line.get("totalCostUSD"), (int, float)):
                    self.total_cost = float(line["totalCostUSD"])
                if kind == "user" and isinstance(line.get("message", {}).get("content"), str):
                    if not line.get("isMeta"):
                        self.user_turns += 1
                if "uuid" in line and kind in ("user", "assistant", "attachment", "system"):
                    self.leaf = str(line["uuid"])
                    content = line.get("message", {}).get("content") if kind in ("user", "assistant") else None
                    self.leaf_is_unanswered_prompt = kind == "user" and isinstance(content, str)
                    if kind == "attachment":
                        self.leaf_is_unanswered_prompt = False

    def write(self, line: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")

    def _common(self) -> dict[str, Any]:
        return {
            "userType": "external",
            "entrypoint": "sdk-cli",
            "cwd": self.cwd,
            "sessionId": self.session_id,
            "version": VERSION,
            "gitBranch": "HEAD",
        }

    def chain(self, line: dict[str, Any]) -> str:
        uid = new_uuid()
        full = {"parentUuid": self.leaf, "isSidechain": False, **line, "uuid": uid, "timestamp": now_iso()}
        full.update(self._common())
        self.write(full)
        self.leaf = uid
        return uid

    def queue(self, prompt: str) -> None:
        self.write(
            {
                "type": "queue-operation",
                "operation": "enqueue",
                "timestamp": now_iso(),
                "sessionId": self.session_id,
                "content": prompt,
            }
        )
        self.write(
            {"type": "queue-operation", "operation": "dequeue", "timestamp": now_iso(), "sessionId": self.session_id}
        )

    def user_prompt(self, prompt: str, prompt_id: str) -> str:
        if self.leaf_is_unanswered_prompt:
            self.assistant_synthetic("No response requested.")
        self.user_turns += 1
        return self.chain(
            {
                "promptId": prompt_id,
                "type": "user",
                "message": {"role": "user", "content": prompt},
                "permissionMode": self.permission_mode,
                "promptSource": "sdk",
                "turnOrigin": "sdk",
                "turnPosition": {"promptIndex": 0, "turnIndex": self.user_turns},
            }
        )

    def attachment(self, attachment: dict[str, Any]) -> str:
        return self.chain({"attachment": attachment, "type": "attachment"})

    def assistant(self, message_id: str, block: dict[str, Any], stop_reason: str, request_id: str) -> str:
        return self.chain(
            {
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": [block],
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                    "usage": usage(10, 12),
                    "stop_details": None,
                },
                "requestId": request_id,
                "type": "assistant",
            }
        )

    def assistant_synthetic(self, text: str, api_error: tuple[int, str] | None = None) -> str:
        line: dict[str, Any] = {
            "type": "assistant",
            "message": {
                "id": new_uuid(),
                "container": None,
                "model": "<synthetic>",
                "role": "assistant",
                "stop_details": None,
                "stop_reason": "stop_sequence",
                "stop_sequence": "",
                "type": "message",
                "usage": usage(0, 0),
                "content": [{"type": "text", "text": text}],
                "context_management": None,
            },
        }
        if api_error is not None:
            line.update(
                {
                    "requestId": f"req_fake_{os.urandom(6).hex()}",
                    "error": "server_error" if api_error[0] >= 500 else "api_error",
                    "isApiErrorMessage": True,
                    "apiErrorStatus": api_error[0],
                    "apiErrorType": api_error[1],
                }
            )
        else:
            line["isApiErrorMessage"] = False
        return self.chain(line)

    def tool_result(self, tool_use_id: str, content: str, is_error: bool, source_uuid: str, prompt_id: str) -> str:
        return self.chain(
            {
                "promptId": prompt_id,
                "type": "user",
                "message": {
                    "role": "user",
                    "content": [
                        {"tool_use_id": tool_use_id, "type": "tool_result", "content": content, "is_error": is_error}
                    ],
                },
                "toolUseResult": {"stdout": "" if is_error else content, "stderr": "", "interrupted": False},
                "sourceToolAssistantUUID": source_uuid,
            }
        )

    def finish(self, prompt: str, cost: float | None) -> None:
        self.write({"type": "last-prompt", "lastPrompt": prompt, "leafUuid": self.leaf, "sessionId": self.session_id})
        if cost is not None:
            self.total_cost += cost
            self.write(
                {
                    "type": "cost-state",
                    "sessionId": self.session_id,
                    "totalCostUSD": self.total_cost,
                    "modelUsage": {self.model: {"inputTokens": 10, "outputTokens": 12, "costUSD": cost}},
                }
            )

    def mode_line(self) -> None:
        self.write({"type": "mode", "mode": "normal", "sessionId": self.session_id})


def usage(inp: int, out: int) -> dict[str, Any]:
    return {
        "input_tokens": inp,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": out,
        "output_tokens_details": {"thinking_tokens": 0},
        "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
        "service_tier": "standard",
        "cache_creation": {"ephemeral_1h_input_tokens": 0, "ephemeral_5m_input_tokens": 0},
        "inference_geo": "",
        "iterations": [],
        "speed": "standard",
        "fallback_credit": None,
    }


# --- the run -------------------------------------------------------------------------------------------------


class Terminated(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _on_signal(signum: int, frame: object) -> None:
    raise Terminated(128 + signum)


class Run:
    def __init__(self, args: Args, prompt: str) -> None:
        self.args = args
        self.prompt = prompt
        self.started = time.monotonic()
        self.fmt: str = args.get("output-format", "text")
        self.verbose = bool(args.get("verbose"))
        self.model: str = args.get("model") or DEFAULT_MODEL
        self.permission_mode: str = args.get("permission-mode") or "default"
        self.cwd = os.getcwd()  # the physical path, like the real CLI
        self.config_dir = Path(os.environ.get("CLAUDE_CONFIG_DIR") or Path.home() / ".claude")
        self.stream_lines: list[dict[str, Any]] = []
        self.transcript = self._open_session()
        self.prompt_id = new_uuid()

    def _open_session(self) -> Transcript:
        projects = self.config_dir / "projects"
        here = projects / encode_project_dir(self.cwd)
        session_id: str | None = self.args.get("session-id")
        resume = self.args.get("resume")
        if resume is not None:
            resume = str(resume)
            found = sorted(projects.glob(f"*/{resume}.jsonl")) if projects.is_dir() else []
            if not found:
                fail(f"No conversation found with session ID: {resume}")
            path = here / found[0].name if (here / found[0].name).exists() else found[0]
            return Transcript(path, path.stem, self.cwd, self.model, self.permission_mode)
        if session_id is not None:
            if (here / f"{session_id}.jsonl").exists():
                fail(f"Error: Session ID {session_id} is already in use.")
        else:
            session_id = new_uuid()
        return Transcript(here / f"{session_id}.jsonl", session_id, self.cwd, self.model, self.permission_mode)

    @property
    def session_id(self) -> str:
        return self.transcript.session_id

    # output

    def emit(self, line: dict[str, Any]) -> None:
        if self.fmt == "stream-json":
            sys.stdout.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
            sys.stdout.flush()
        elif self.fmt == "json" and self.verbose:
            self.stream_lines.append(line)

    def init_line(self) -> None:
        tools = split_tools(self.args.get("tools"))
        self.emit(
            {
                "type": "system",
                "subtype": "init",
                "cwd": self.cwd,
                "session_id": self.session_id,
                "tools": DEFAULT_TOOLS if tools is None or tools == ["default"] else tools,
                "mcp_servers": [],
                "model": self.model,
                "permissionMode": self.permission_mode,
                "slash_commands": [],
                "apiKeySource": "ANTHROPIC_API_KEY" if os.environ.get("ANTHROPIC_API_KEY") else "none",
                "claude_code_version": VERSION,
                "output_style": "default",
                "agents": [],
                "skills": [],
                "plugins": [],
                "uuid": new_uuid(),
                "fast_mode_state": "off",
            }
        )

    def assistant_event(self, message_id: str, block: dict[str, Any], request_id: str) -> None:
        self.emit(
            {
                "type": "assistant",
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": [block],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 10, "output_tokens": 1},
                    "context_management": None,
                },
                "parent_tool_use_id": None,
                "session_id": self.session_id,
                "uuid": new_uuid(),
                "timestamp": now_iso(),
                "request_id": request_id,
            }
        )

    def user_event(self, tool_use_id: str, content: str, is_error: bool) -> None:
        self.emit(
            {
                "type": "user",
                "message": {
                    "role": "user",
                    "content": [
                        {"tool_use_id": tool_use_id, "type": "tool_result", "content": content, "is_error": is_error}
                    ],
                },
                "parent_tool_use_id": None,
                "session_id": self.session_id,
                "uuid": new_uuid(),
                "timestamp": now_iso(),
            }
        )

    def result(self, fields: dict[str, Any], calls: int, exit_code: int) -> NoReturn:
        duration = int((time.monotonic() - self.started) * 1000)
        cost = COST_PER_CALL * calls
        obj: dict[str, Any] = {
            "duration_api_ms": 30 * calls,
            "stop_reason": "end_turn",
            "session_id": self.session_id,
            "total_cost_usd": self.transcript.total_cost,  # cumulative over the session, like 2.1.332
            "usage": usage(10 * calls, 12 * calls),
            "modelUsage": (
                {
                    self.model: {
                        "inputTokens": 10 * calls,
                        "outputTokens": 12 * calls,
                        "cacheReadInputTokens": 0,
                        "cacheCreationInputTokens": 0,
                        "webSearchRequests": 0,
                        "costUSD": cost,
                        "contextWindow": 1000000,
                        "maxOutputTokens": 128000,
                    }
                }
                if calls
                else {}
            ),
            "permission_denials": [],
            "terminal_reason": "completed",
            "fast_mode_state": "off",
            "is_error": False,
            "num_turns": 1,
            "subtype": "success",
            "api_error_status": None,
        }
        obj.update(fields)
        if obj["subtype"] != "success":  # error_max_turns & co. carry `errors`, no `result`/`api_error_status`
            obj.pop("api_error_status", None)
            obj.pop("result", None)
        obj.update({"type": "result", "duration_ms": duration, "uuid": new_uuid()})
        if self.fmt == "stream-json":
            self.emit(obj)
        elif self.fmt == "json":
            if self.verbose:
                self.stream_lines.append(obj)
                sys.stdout.write(json.dumps(self.stream_lines, ensure_ascii=False, separators=(",", ":")) + "\n")
            else:
                sys.stdout.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
        elif "result" in obj:
            sys.stdout.write(str(obj["result"]) + "\n")
        else:
            sys.stdout.write(f"Error: Reached max turns ({self.max_turns()})")
        sys.stdout.flush()
        raise SystemExit(exit_code)

    def max_turns(self) -> int:
        raw = self.args.get("max-turns")
        return int(float(raw)) if raw is not None else 0

    # behaviour

    def directives(self) -> list[tuple[str, str]]:
        return [(m.group(1), (m.group(2) or "").strip()) for m in DIRECTIVE_RE.finditer(self.prompt)]

    def tool_permission(self, name: str) -> tuple[bool, str]:
        """(allowed, tool_result text) for a call of tool ``name`` under the run's flags."""
        tools = split_tools(self.args.get("tools"))
        available = tools is None or tools == ["default"] or name in tools
        if not available:
            return False, (
                f"<tool_use_error>Error: No such tool available: {name}. {name} is disabled for this session, "
                "in subagents as well as here.</tool_use_error>"
            )
        allowed = split_tools(self.args.get("allowedTools")) or []
        denied = split_tools(self.args.get("disallowedTools")) or []

        def matches(rules: list[str]) -> bool:
            return any(r == name or r.startswith(name + "(") for r in rules)

        if matches(denied):
            return False, f"Permission to use {name} has been denied."
        if matches(allowed) or self.permission_mode in ("bypassPermissions", "acceptEdits", "auto"):
            return True, "fake tool output"
        if self.permission_mode == "dontAsk":
            return False, (
                f"Permission to use {name} has been denied because Claude Code is running in don't ask mode."
            )
        if self.permission_mode == "plan":
            return False, f"Permission to use {name} has been denied in plan mode."
        return True, "fake tool output"  # default mode: the fake's tools are read-only

    def run(self) -> NoReturn:
        t = self.transcript
        t.queue(self.prompt)
        t.user_prompt(self.prompt, self.prompt_id)
        if t.user_turns == 1:
            t.attachment({"type": "date", "date": datetime.now(UTC).strftime("%Y-%m-%d")})
        self.init_line()
        turn = t.user_turns
        directives = self.directives()
        names = [d[0] for d in directives]
        request_id = f"req_fake_{os.urandom(6).hex()}"
        message_id = f"msg_fake_{turn}_{os.urandom(4).hex()}"

        for name, value in directives:
            if name == "sleep":
                seconds = float(value or "1")
                if self.fmt == "stream-json" or (self.fmt == "json" and self.verbose):
                    tool_id = f"toolu_fake_{os.urandom(6).hex()}"
                    block = {"type": "tool_use", "id": tool_id, "name": "Bash", "input": {"command": f"sleep {value}"}}
                    self.assistant_event(message_id, block, request_id)
                time.sleep(seconds)
            elif name == "hang":
                while True:
                    time.sleep(3600)
            elif name == "exit":
                code = int(value or "1")
                sys.stderr.write(f"fake_claude: exiting with status {code} as asked\n")
                t.finish(self.prompt, None)
                raise SystemExit(code)

        if "api-error" in names:
            status = int(dict(directives)["api-error"] or "500")
            self.api_error(status)
        if "max-turns" in names:
            self.max_turns_error(message_id, request_id)

        reply = f"FAKE REPLY #{turn} to: {self.prompt}"
        calls = 1
        num_turns = 1
        denials: list[dict[str, Any]] = []
        if "tool" in names:
            tool_name = dict(directives)["tool"] or "Bash"
            tool_id = f"toolu_fake_{os.urandom(6).hex()}"
            tool_input = {"command": "echo fake", "description": "fake tool call"} if tool_name == "Bash" else {}
            block = {"type": "tool_use", "id": tool_id, "name": tool_name, "input": tool_input}
            source = t.assistant(message_id, block, "tool_use", request_id)
            self.assistant_event(message_id, block, request_id)
            allowed, output = self.tool_permission(tool_name)
            if not allowed and "No such tool" not in output:
                denials.append({"tool_name": tool_name, "tool_use_id": tool_id, "tool_input": tool_input})
            t.tool_result(tool_id, output, not allowed, source, self.prompt_id)
            self.user_event(tool_id, output, not allowed)
            if 0 < self.max_turns() < 2:
                t.finish(self.prompt, COST_PER_CALL)
                self.result(
                    {
                        "stop_reason": "tool_use",
                        "terminal_reason": "max_turns",
                        "is_error": True,
                        "num_turns": 2,
                        "subtype": "error_max_turns",
                        "errors": [f"Reached maximum number of turns ({self.max_turns()})"],
                    },
                    1,
                    1,
                )
            reply = f"FAKE REPLY #{turn} to: {self.prompt} (used tool {tool_name}: {output})"
            calls = 2
            num_turns = 2
            request_id = f"req_fake_{os.urandom(6).hex()}"
            message_id = f"msg_fake_{turn}b_{os.urandom(4).hex()}"
        if "big" in names:
            size = int(dict(directives)["big"] or "100000")
            head = reply.encode("utf-8")[: max(0, size)]
            reply = (head + b"x" * (size - len(head))).decode("utf-8", "ignore")
            reply += "x" * (size - len(reply.encode("utf-8")))

        block = {"type": "text", "text": reply}
        t.assistant(message_id, block, "end_turn", request_id)
        self.assistant_event(message_id, block, request_id)
        t.finish(self.prompt, COST_PER_CALL * calls)
        t.mode_line()

        if "garbage" in names:
            sys.stdout.write("this is not JSON {{{ <html>502 Bad Gateway</html>\n")
            raise SystemExit(0)
        if "empty" in names:
            raise SystemExit(0)
        self.result(
            {"result": reply, "num_turns": num_turns, "permission_denials": denials, "stop_reason": "end_turn"},
            calls,
            0,
        )

    def api_error(self, status: int) -> NoReturn:
        base = os.environ.get("ANTHROPIC_BASE_URL", "https://api.anthropic.com")
        gateway = re.sub(r"^[a-z]+://", "", base).rstrip("/")
        server_side = (
            "This is a server-side issue, usually temporary — try again in a moment. "
            f"If it persists, check your inference gateway ({gateway})."
        )
        error_type = {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            429: "rate_limit_error",
            529: "overloaded_error",
        }.get(status, "api_error")
        if status == 401:
            text = "Invalid API key · Fix external API key"
        elif status == 429:
            text = "API Error: Request rejected (429) · Rate limited (fake)"
        elif status == 529:
            text = f"API Error: 529 Overloaded (fake). {server_side}"
        elif status >= 500:
            text = f"API Error: {status} Internal server error (fake). {server_side}"
        else:
            text = f"API Error: {status} Error {status} (fake)"
        self.transcript.assistant_synthetic(text, (status, error_type))
        self.emit(
            {
                "type": "assistant",
                "message": {
                    "id": new_uuid(),
                    "model": "<synthetic>",
                    "role": "assistant",
                    "stop_reason": "stop_sequence",
                    "stop_sequence": "",
                    "type": "message",
                    "usage": usage(0, 0),
                    "content": [{"type": "text", "text": text}],
                },
                "parent_tool_use_id": None,
                "session_id": self.session_id,
                "uuid": new_uuid(),
                "error": "server_error" if status >= 500 else "unknown",
            }
        )
        self.transcript.finish(self.prompt, None)
        self.result(
            {
                "duration_api_ms": 0,
                "stop_reason": "stop_sequence",
                "terminal_reason": "api_error",
                "is_error": True,
                "num_turns": 1,
                "subtype": "success",
                "api_error_status": status,
                "api_error_type": error_type,
                "result": text,
            },
            0,
            1,
        )

    def max_turns_error(self, message_id: str, request_id: str) -> NoReturn:
        limit = self.max_turns() or 1
        tool_id = f"toolu_fake_{os.urandom(6).hex()}"
        block = {"type": "tool_use", "id": tool_id, "name": "Bash", "input": {"command": "echo again"}}
        source = self.transcript.assistant(message_id, block, "tool_use", request_id)
        self.assistant_event(message_id, block, request_id)
        self.transcript.tool_result(tool_id, "again", False, source, self.prompt_id)
        self.user_event(tool_id, "again", False)
        self.transcript.finish(self.prompt, COST_PER_CALL * limit)
        self.result(
            {
                "stop_reason": "tool_use",
                "terminal_reason": "max_turns",
                "is_error": True,
                "num_turns": limit + 1,
                "subtype": "error_max_turns",
                "errors": [f"Reached maximum number of turns ({limit})"],
            },
            limit,
            1,
        )


# --- entry point ---------------------------------------------------------------------------------------------


def log_invocation(argv: list[str]) -> None:
    path = os.environ.get("FAKE_CLAUDE_LOG")
    if not path:
        return
    shown = ("CLAUDE_CONFIG_DIR", "CLAUDE_CODE_TMPDIR", "HOME", "CLAUDE_CODE_MAX_RETRIES", "ANTHROPIC_BASE_URL")
    entry = {
        "pid": os.getpid(),
        "argv": argv,
        "env_keys": sorted(os.environ),
        "env": {k: os.environ[k] for k in shown if k in os.environ},
        "cwd": os.getcwd(),
        "stdin": stdin_kind(),
        "time": time.time(),
    }
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")


def main(argv: list[str]) -> int:
    pidfile: Path | None = None
    piddir = os.environ.get("FAKE_CLAUDE_PIDFILE_DIR")
    if piddir:
        pidfile = Path(piddir) / str(os.getpid())
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{os.getpid()}\n")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    run: Run | None = None
    try:
        log_invocation(argv)
        args = parse_args(argv)
        if args.get("version"):
            sys.stdout.write(f"{VERSION} (Claude Code)\n")
            return 0
        validate(args)
        run = Run(args, "")  # checks the session before reading stdin, like the real CLI
        run.prompt = read_prompt(args)
        run.run()
    except Terminated as exc:
        # Like the real CLI: the transcript keeps the unanswered prompt (plus last-prompt), stdout stays empty.
        if run is not None and run.prompt:
            try:
                run.transcript.finish(run.prompt, None)
                run.transcript.mode_line()
            except OSError:
                pass
        return exc.code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        if pidfile is not None:
            try:
                pidfile.unlink()
            except FileNotFoundError:
                pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
