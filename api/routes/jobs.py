"""Ask (admit, enqueue), poll and cancel."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated

import anyio
import redis
from fastapi import APIRouter, Query, Response
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from api.context import AppContext
from api.deps import ContextDep, CurrentUser, OriginGuard
from api.enqueue import enqueue_ask
from api.jobview import read_view, wait_view
from shared.admission import LeaseRef
from shared.audit import MESSAGE_PREVIEW_CHARS, preview
from shared.errors import (
    ConcurrencyLimited,
    NotFound,
    RateLimited,
    RedisUnavailable,
    ServiceError,
    SessionBusy,
)
from shared.models import TERMINAL_STATUSES, AskAccepted, AskRequest, JobView

router = APIRouter(prefix="/agent")

REFUSAL_EVENTS: dict[type[ServiceError], str] = {
    RateLimited: "rate_limited",
    ConcurrencyLimited: "concurrency_blocked",
    SessionBusy: "session_busy",
}
STOP_WAIT_S = 10.0


def _valid_job_id(job_id: str) -> str:
    try:
        return str(uuid.UUID(job_id))
    except ValueError:
        raise NotFound("no such job") from None


@router.post("/ask", status_code=202, response_model=AskAccepted, dependencies=[OriginGuard])
async def ask(body: AskRequest, response: Response, ctx: ContextDep, user: CurrentUser) -> AskAccepted:
    """Admit the ask (rate, concurrency, one turn per session, queue cap) and enqueue it; answers at once."""
    session_id = str(body.session_id)
    ref = LeaseRef(user=user, session_id=session_id, job_id=str(uuid.uuid4()))
    try:
        position = await ctx.admission.admit(ref)
    except ServiceError as refusal:
        event = REFUSAL_EVENTS.get(type(refusal))
        if event:
            ctx.audit.write(event, user=user, session_id=session_id, message=preview(body.message, 200),
                            retry_after_s=refusal.retry_after_s, blocking_job_id=refusal.extra.get("job_id"))
        raise
    try:
        await enqueue_ask(ctx, ref, body.message)
    except Exception as exc:
        await ctx.admission.release(ref, refund=True)  # nothing was queued: give the slot and the ask back
        if isinstance(exc, redis.RedisError):
            raise RedisUnavailable("the job store is unavailable; try again shortly", retry_after_s=5) from None
        raise
    ctx.audit.write("enqueued", user=user, session_id=session_id, job_id=ref.job_id,
                    message=preview(body.message, MESSAGE_PREVIEW_CHARS), message_len=len(body.message),
                    position=position)
    response.headers["Location"] = f"/agent/jobs/{ref.job_id}"
    return AskAccepted(job_id=ref.job_id, session_id=session_id, position=position)


@router.get("/jobs/{job_id}", response_model=JobView, response_model_exclude_none=True)
async def get_job(
    job_id: str, ctx: ContextDep, user: CurrentUser,
    wait: Annotated[float, Query(ge=0, le=25, description="long-poll up to this many seconds")] = 0,
) -> Response:
    job_id = _valid_job_id(job_id)
    view = await (wait_view(ctx, job_id, user, wait) if wait > 0 else read_view(ctx, job_id, user))
    # The view is already a validated JobView: serialise it once (response_model stays for the schema).
    return Response(view.model_dump_json(exclude_none=True), media_type="application/json")


@router.delete("/jobs/{job_id}", response_model=JobView, response_model_exclude_none=True,
               dependencies=[OriginGuard])
async def cancel_job(job_id: str, ctx: ContextDep, user: CurrentUser) -> JobView:
    """Cancel a queued job (deleting it) or stop a running one (its claude dies too). Idempotent."""
    job_id = _valid_job_id(job_id)
    view = await read_view(ctx, job_id, user)
    if view.status in TERMINAL_STATUSES:
        return view
    ref = LeaseRef(user=user, session_id=view.session_id, job_id=job_id)
    if view.status == "queued" and await anyio.to_thread.run_sync(_cancel_queued, ctx, ref, view):
        await ctx.admission.release(ref)
        audit_canceled(ctx, ref, "queued")
        return await read_view(ctx, job_id, user)
    await anyio.to_thread.run_sync(_stop_running, ctx, job_id)
    deadline = time.monotonic() + STOP_WAIT_S
    while view.status not in TERMINAL_STATUSES and time.monotonic() < deadline:
        view = await wait_view(ctx, job_id, user, 1.0)
    if view.status == "canceled":
        await ctx.admission.release(ref)
        audit_canceled(ctx, ref, "running")
    return view


def _cancel_queued(ctx: AppContext, ref: LeaseRef, view: JobView) -> bool:
    """Tombstone then delete a queued job; False when a worker took it first (then it must be stopped)."""
    tombstone = {
        "user": ref.user, "session_id": ref.session_id, "status": "canceled",
        "error": {"code": "canceled", "message": "canceled at your request before it started"},
        "enqueued_at": view.enqueued_at, "ended_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    key = ctx.keys.tombstone(ref.job_id)
    ctx.rq_redis.set(key, json.dumps(tombstone), ex=ctx.settings.result_ttl_s)
    try:
        job = Job.fetch(ref.job_id, connection=ctx.rq_redis, serializer=JSONSerializer)
        if job.get_status() != "queued":
            ctx.rq_redis.delete(key)
            return False
        job.delete()
    except (NoSuchJobError, InvalidJobOperation):
        pass
    return True


def _stop_running(ctx: AppContext, job_id: str) -> None:
    try:
        send_stop_job_command(ctx.rq_redis, job_id, serializer=JSONSerializer)
    except (NoSuchJobError, InvalidJobOperation):
        pass  # it ended meanwhile


def audit_canceled(ctx: AppContext, ref: LeaseRef, stage: str) -> None:
    ctx.audit.terminal(ctx.rq_redis, ctx.keys, ctx.settings.failure_ttl_s, "canceled", ref.job_id,
                       user=ref.user, session_id=ref.session_id, stage=stage)
