"""The audit log: JSON lines shared by the API and every worker.

Each line is written with one `os.write` on a descriptor opened with O_APPEND, so lines from many
processes never interleave, and the file is reopened per line, so logrotate can move it freely. The
writers also create the file after a rotation (logrotate's `nocreate`: a `create` step would race with
them), always with mode 0640 whatever the process umask.
Terminal events (one per job) are deduplicated in Redis because RQ can report an end twice.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import redis

from shared.keys import Keys

log = logging.getLogger("agent.audit")

MESSAGE_PREVIEW_CHARS = 500
RESULT_PREVIEW_CHARS = 300
ERROR_PREVIEW_CHARS = 500
FILE_MODE = 0o640
TERMINAL_EVENTS = frozenset({"ask_ok", "ask_error", "canceled", "expired", "worker_lost"})


def preview(text: str | None, limit: int) -> str:
    return (text or "")[:limit]


class AuditLog:
    """Appends one JSON object per line to `path`; never raises into the caller."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, event: str, **fields: Any) -> None:
        record = {"event": event, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = self._open()
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("audit log %s not writable (%s): %s", self.path, exc, line.decode().rstrip())

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_APPEND
        try:
            return os.open(self.path, flags)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:  # another writer created it first
            return os.open(self.path, flags)
        os.fchmod(fd, FILE_MODE)  # the umask (0077 under the units) must not decide who may read it
        return fd

    def terminal(self, client: redis.Redis, keys: Keys, ttl_s: int, event: str, job_id: str, **fields: Any) -> bool:
        """Write the job's one terminal line; False (and nothing written) when another path already did."""
        assert event in TERMINAL_EVENTS, event
        try:
            first = client.set(keys.audit_end(job_id), event, nx=True, ex=ttl_s)
        except redis.RedisError as exc:
            log.warning("audit dedupe unavailable (%s); writing %s for %s anyway", exc, event, job_id)
            first = True
        if first:
            self.write(event, job_id=job_id, **fields)
        return bool(first)
