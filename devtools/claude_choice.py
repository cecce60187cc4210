"""Which claude the local stack runs: the user's own when it is installed and signed in, else demo mode.

"Signed in" means what the CLI itself would use on Linux: a credential in the environment
(ANTHROPIC_API_KEY, ANTHROPIC_AUTH_TOKEN or CLAUDE_CODE_OAUTH_TOKEN), or an OAuth token in
`$CLAUDE_CONFIG_DIR/.credentials.json` (default `~/.claude/.credentials.json`, where `claude login` keeps it).
An account named in `~/.claude.json` without that token is not enough: the workers run claude with
CLAUDE_CONFIG_DIR set, so they cannot reach a token kept elsewhere (the macOS Keychain).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CREDENTIAL_VARS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN")


@dataclass(frozen=True)
class ClaudeChoice:
    """`binary` and `config_dir` are the user's when `demo` is False; in demo mode the stack installs the pinned
    CLI and gives it a config dir of its own."""

    demo: bool
    reason: str
    binary: str = ""
    config_dir: Path | None = None
    version: str = ""


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def has_oauth_token(credentials: Path) -> bool:
    oauth = _json(credentials).get("claudeAiOauth")
    return isinstance(oauth, dict) and bool(oauth.get("accessToken") or oauth.get("refreshToken"))


def cli_version(binary: str) -> str | None:
    """`claude --version`'s first line, or None when it does not run."""
    try:
        done = subprocess.run([binary, "--version"], stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else None


def choose_claude(environ: Mapping[str, str], home: Path, claude_bin: str = "claude",
                  demo_requested: bool = False) -> ClaudeChoice:
    """Decide, and say why in words a user can act on."""
    if demo_requested:
        return ClaudeChoice(demo=True, reason="AGENT_CLAUDE_DEMO=true asks for demo mode")
    binary = shutil.which(claude_bin, path=environ.get("PATH"))
    if binary is None:
        return ClaudeChoice(demo=True, reason=f"no `{claude_bin}` on PATH")
    config_dir = Path(environ.get("CLAUDE_CONFIG_DIR") or home / ".claude")
    credentials = config_dir / ".credentials.json"
    how = next((f"{name} is set" for name in CREDENTIAL_VARS if environ.get(name, "").strip()), "")
    if not how and has_oauth_token(credentials):
        how = f"signed in (OAuth token in {credentials})"
    if not how:
        hint = ""
        if isinstance(_json(home / ".claude.json").get("oauthAccount"), dict):
            hint = f"; {home / '.claude.json'} names an account but its token is not in that file (Keychain?)"
        return ClaudeChoice(demo=True, reason=(
            f"{binary} is installed but not signed in: none of {', '.join(CREDENTIAL_VARS)} is set and "
            f"{credentials} holds no OAuth token{hint}"))
    version = cli_version(binary)
    if version is None:
        return ClaudeChoice(demo=True, reason=f"{binary} --version failed, so it cannot be used")
    return ClaudeChoice(demo=False, reason=how, binary=binary, config_dir=config_dir, version=version)
