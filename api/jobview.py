"""What a poller sees of a job, read in one Redis round trip (RQ's job hash, queue, results stream)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import zlib
from typing import Any

from api.context import AppContext
from shared.errors import NotFound
from shared.keys import rq_job_key, rq_queue_key, rq_results_key
from shared.models import TERMINAL_STATUSES, JobView

STATUS_MAP = {
    "created": "queued",
    "queued": "queued",
    "deferred": "queued",
    "scheduled": "queued",
    "started": "started",
    "finished": "finished",
    "failed": "failed",
    "stopped": "canceled",
    "canceled": "canceled",
}
FIELDS = ("status", "meta", "enqueued_at", "started_at", "ended_at")
POLL_SLICE_MS = 1000


def _s(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _loads(value: Any) -> Any:
    try:
        return json.loads(value) if value else {}
    except ValueError:
        return {}


def _failure_from_result(entry: dict[bytes, bytes]) -> dict[str, str]:
    text = ""
    if b"exc_string" in entry:
        try:
            text = zlib.decompress(base64.b64decode(entry[b"exc_string"])).decode(errors="replace")
        except (ValueError, zlib.error):
            text = ""
    if "AbandonedJobError" in text or "Work-horse terminated" in text:
        return {"code": "worker_lost", "message": "the worker was lost while running your question; please ask again"}
    if "JobTimeoutException" in text:
        return {"code": "timeout", "message": "the job ran out of time"}
    return {"code": "failed", "message": "the job failed; please ask again"}


def build_view(job_id: str, user: str, raw: list[Any]) -> JobView:
    """Turn the pipeline's replies into the poll body; NotFound unless the job exists and is the user's."""
    fields, position, results, tombstone = raw
    if tombstone:
        gone = _loads(tombstone)
        if gone.get("user") != user:
            raise NotFound("no such job")
        return JobView(job_id=job_id, session_id=gone.get("session_id", ""), status=gone["status"],
                       error=gone.get("error"), enqueued_at=gone.get("enqueued_at"), ended_at=gone.get("ended_at"))
    status_raw, meta_raw, enqueued_at, started_at, ended_at = (_s(v) for v in fields)
    meta = _loads(meta_raw)
    if status_raw is None or meta.get("user") != user:
        raise NotFound("no such job")
    status = STATUS_MAP.get(status_raw, "queued")
    view: dict[str, Any] = {"job_id": job_id, "session_id": meta.get("session_id", ""), "status": status,
                            "enqueued_at": enqueued_at, "started_at": started_at or None, "ended_at": ended_at or None}
    if status == "queued":
        view["position"] = int(position) if position is not None else 0
    elif status == "started":
        view["progress"] = meta.get("progress") or {"turns": 0, "tool": None, "updated_at": None}
    elif status == "finished":
        entry = results[0][1] if results else {}
        value = entry.get(b"return_value")
        view["result"] = json.loads(base64.b64decode(value)) if value else None
        if view["result"] is None:
            view["status"] = "failed"
            view["error"] = {"code": "no_result", "message": "the job ended without an answer"}
    else:
        error = meta.get("error")
        if not error and status == "canceled":
            error = {"code": "canceled", "message": "canceled at your request"}
        view["error"] = error or _failure_from_result(results[0][1] if results else {})
    return JobView.model_validate(view)


async def read_view(ctx: AppContext, job_id: str, user: str) -> JobView:
    async with ctx.redis.pipeline(transaction=False) as pipe:
        pipe.hmget(rq_job_key(job_id), FIELDS)
        pipe.lpos(rq_queue_key(ctx.settings.queue), job_id)
        pipe.xrevrange(rq_results_key(job_id), count=1)
        pipe.get(ctx.keys.tombstone(job_id))
        raw = await pipe.execute()
    return build_view(job_id, user, raw)


def _fingerprint(view: JobView) -> tuple[Any, ...]:
    progress = view.progress.model_dump() if view.progress else None
    return (view.status, view.position, json.dumps(progress, sort_keys=True))


async def wait_view(ctx: AppContext, job_id: str, user: str, wait_s: float) -> JobView:
    """Long-poll: answer when the job ends or changes (status, position, progress), or after `wait_s`.

    The end wakes the waiter at once through RQ's results stream (a blocking XREAD); other changes
    are seen within a second.
    """
    view = await read_view(ctx, job_id, user)
    deadline = time.monotonic() + min(wait_s, ctx.settings.long_poll_max_s)
    first = _fingerprint(view)
    while view.status not in TERMINAL_STATUSES:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0:
            break
        block_ms = min(POLL_SLICE_MS, remaining_ms)
        ended = await ctx.redis.xread({rq_results_key(job_id): "0-0"}, count=1, block=block_ms)
        view = await read_view(ctx, job_id, user)
        if _fingerprint(view) != first:
            break
        if ended and view.status not in TERMINAL_STATUSES:
            await asyncio.sleep(0.005)  # the result is written just before the status: look again shortly
    return view
