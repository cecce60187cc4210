"""Where the claude CLI keeps a session's transcript, and its replay as a chat history.

Path: `$CLAUDE_CONFIG_DIR/projects/<physical cwd, every UTF-16 unit outside [A-Za-z0-9] as '-'>/<id>.jsonl`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MAX_DIR_NAME = 200


def _java_hash_b36(text: str) -> str:
    """abs(Java's String.hashCode over UTF-16 units) in base 36: the CLI's suffix for long names."""
    h = 0
    data = text.encode("utf-16-le", "surrogatepass")
    for i in range(0, len(data), 2):
        h = (h * 31 + int.from_bytes(data[i : i + 2], "little")) & 0xFFFFFFFF
    n = abs(h - 2**32 if h >= 2**31 else h)
    digits = ""
    while True:
        n, r = divmod(n, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + digits
        if n == 0:
            return digits


def encode_cwd(cwd: str) -> str:
    """The CLI's directory name for a cwd: every UTF-16 unit outside [A-Za-z0-9] as '-' (so a character
    beyond the BMP becomes two), cut at 200 characters plus '-' and a hash when longer."""
    name = "".join(ch if ch.isascii() and ch.isalnum() else "-" * (2 if ord(ch) > 0xFFFF else 1) for ch in cwd)
    if len(name) <= MAX_DIR_NAME:
        return name
    return f"{name[:MAX_DIR_NAME]}-{_java_hash_b36(cwd)}"


def project_dir(config_dir: Path, cwd: Path) -> Path:
    """The folder of the CLI's transcripts for sessions run in `cwd` (its physical path)."""
    return config_dir / "projects" / encode_cwd(str(cwd.resolve()))


def transcript_path(config_dir: Path, cwd: Path, session_id: str) -> Path:
    """The transcript file of `session_id`; the id must be a UUID, so no path can be smuggled in."""
    canonical = str(uuid.UUID(session_id))
    if canonical != session_id.lower():
        raise ValueError("session id must be a canonical UUID")
    return project_dir(config_dir, cwd) / f"{canonical}.jsonl"


def _text_blocks(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            block.get("text", "") for block in content if isinstance(block, dict) and block.get("type") == "text"
        )
    return ""


def _records(lines: Iterable[str]) -> Iterable[dict[str, Any]]:
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a half-written last line while the CLI is still writing
        if isinstance(record, dict):
            yield record


def replay(lines: Iterable[str]) -> list[dict[str, Any]]:
    """User prompts and assistant text, in order; one entry per assistant response (split lines merged).

    Left out: meta and synthetic lines (`isMeta`, `model: "<synthetic>"`), tool use and tool results,
    sidechains, and every line type other than `user` and `assistant`.
    """
    messages: list[dict[str, Any]] = []
    by_message_id: dict[str, dict[str, Any]] = {}
    for record in _records(lines):
        kind = record.get("type")
        if kind not in ("user", "assistant") or record.get("isMeta") or record.get("isSidechain"):
            continue
        message = record.get("message")
        if not isinstance(message, dict):
            continue
        if kind == "user":
            content = message.get("content")
            if isinstance(content, list) and any(
                isinstance(b, dict) and b.get("type") == "tool_result" for b in content
            ):
                continue
            text = _text_blocks(content)
            if text and not text.startswith(("<command-", "<local-command")):
                messages.append({"role": "user", "text": text, "timestamp": record.get("timestamp")})
            continue
        if message.get("model") == "<synthetic>" or record.get("isApiErrorMessage"):
            continue
        text = _text_blocks(message.get("content"))
        if not text:
            continue
        message_id = message.get("id")
        if isinstance(message_id, str) and message_id in by_message_id:
            by_message_id[message_id]["text"] += text
            continue
        entry = {"role": "assistant", "text": text, "timestamp": record.get("timestamp")}
        messages.append(entry)
        if isinstance(message_id, str):
            by_message_id[message_id] = entry
    return messages


def read_history(path: Path) -> list[dict[str, Any]]:
    """The replay of the transcript at `path`; [] when the session has no turns yet."""
    try:
        with path.open("r", encoding="utf-8", errors="replace") as handle:
            return replay(handle)
    except FileNotFoundError:
        return []
