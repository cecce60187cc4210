"""The ask job and its end-of-life handlers; each terminal path releases the lease and audits once."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from datetime import UTC, datetime
from typing import Any

import redis
from rq.exceptions import AbandonedJobError
from rq.job import Job, get_current_job
from rq.timeouts import JobTimeoutException

from shared.admission import LeaseRef, SyncAdmission
from shared.audit import ERROR_PREVIEW_CHARS, MESSAGE_PREVIEW_CHARS, RESULT_PREVIEW_CHARS, AuditLog, preview
from shared.errors import JobFailed
from shared.keys import Keys
from shared.settings import Settings, get_settings
from worker.claude import PR_SET_PDEATHSIG, ClaudeRunner

log = logging.getLogger("agent.worker")

WORKER_LOST = "the worker running your question was lost ({why}); please ask again"


def _ref(job: Job) -> LeaseRef:
    return LeaseRef(user=job.meta["user"], session_id=job.meta["session_id"], job_id=job.id)


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _ms_between(start: datetime | None, end: datetime | None) -> int | None:
    if start is None or end is None:
        return None
    return int((_aware(end) - _aware(start)).total_seconds() * 1000)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _horse_dies_with_worker() -> None:
    """A work-horse whose worker is SIGKILLed would run on (it has its own process group): tie it to it."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(1)  # the worker is already gone


def run_ask(user: str, session_id: str, message: str) -> dict[str, Any]:
    """Run one turn of the conversation; return the result fields, or raise JobFailed (RQ records the failure)."""
    job = get_current_job()
    assert job is not None and job.connection is not None
    settings = get_settings()
    conn = job.connection
    keys = Keys(settings.key_prefix)
    ref = LeaseRef(user=user, session_id=session_id, job_id=job.id)
    admission = SyncAdmission(settings, conn)
    _horse_dies_with_worker()
    if conn.exists(keys.tombstone(job.id)):
        fail(job, JobFailed("canceled", "canceled at your request before it started"))
    waited_s = (_ms_between(job.enqueued_at, _utcnow()) or 0) / 1000
    if waited_s > settings.queue_ttl_s:
        fail(job, JobFailed("expired", f"your question waited more than {settings.queue_ttl_s} s in the queue; "
                                       "please ask again"))
    if admission.renew(ref) == 0:
        fail(job, JobFailed("session_conflict", "another turn of this conversation is running; ask again when it ends"))
    started = _utcnow()
    AuditLog(settings.audit_log).write(
        "ask_start", user=user, session_id=session_id, job_id=job.id, worker=job.worker_name,
        queue_wait_ms=_ms_between(job.enqueued_at, started),
        message=preview(message, MESSAGE_PREVIEW_CHARS), message_len=len(message),
    )

    def tick() -> None:
        try:
            if admission.renew(ref) == 0:
                log.warning("job %s: the session lock is held by another job", job.id)
        except redis.RedisError as exc:
            log.warning("job %s: lease renewal failed (%s); retrying", job.id, exc)

    def on_progress(progress: dict[str, Any]) -> None:
        job.meta["progress"] = progress
        try:
            job.save_meta()
        except redis.RedisError as exc:
            log.warning("job %s: progress not saved (%s)", job.id, exc)

    runner = ClaudeRunner(settings, job.id, tick=tick, on_progress=on_progress)
    try:
        result = runner.run_turn(session_id, message)
    except JobFailed as exc:
        fail(job, exc)
    finished(job, settings, result, started, runner.wall_ms)
    return result


def fail(job: Job, exc: JobFailed) -> Any:
    """Make the error visible to pollers before RQ marks the job failed, then raise it."""
    job.meta["error"] = {"code": exc.code, "message": exc.message}
    try:
        job.save_meta()
    except redis.RedisError:
        log.warning("job %s: error not saved in meta", job.id)
    raise exc


def finished(job: Job, settings: Settings, result: dict[str, Any], started: datetime, subprocess_ms: int) -> None:
    ref = _ref(job)
    SyncAdmission(settings, job.connection).release(ref)
    AuditLog(settings.audit_log).terminal(
        job.connection, Keys(settings.key_prefix), settings.failure_ttl_s, "ask_ok", job.id,
        user=ref.user, session_id=ref.session_id, worker=job.worker_name,
        queue_wait_ms=_ms_between(job.enqueued_at, started), run_ms=_ms_between(started, _utcnow()),
        turns=result["num_turns"], subprocess_ms=subprocess_ms,
        cli_duration_ms=result["duration_ms"], denied_tools=result["denied_tools"],
        result_preview=preview(result["result"], RESULT_PREVIEW_CHARS), result_len=len(result["result"]),
    )


def end_job(job: Job, connection: redis.Redis, event: str, code: str, message: str, **extra: Any) -> None:
    """A terminal path other than success: error in meta (unless the job set a more precise one),
    lease released by its owner token, one audit line."""
    settings = get_settings()
    error = job.meta.get("error") or {"code": code, "message": message}
    if "error" not in job.meta:
        job.meta["error"] = error
        try:
            job.save_meta()
        except redis.RedisError:
            log.warning("job %s: error not saved in meta", job.id)
    ref = _ref(job)
    SyncAdmission(settings, connection).release(ref)
    run_ms = _ms_between(job.started_at, _utcnow()) if job.started_at else None
    AuditLog(settings.audit_log).terminal(
        connection, Keys(settings.key_prefix), settings.failure_ttl_s, event, job.id,
        user=ref.user, session_id=ref.session_id, worker=job.worker_name, run_ms=run_ms,
        queue_wait_ms=_ms_between(job.enqueued_at, job.started_at), code=error["code"],
        error=preview(error["message"], ERROR_PREVIEW_CHARS), **extra,
    )


def on_failure(job: Job, connection: redis.Redis, exc_type: type[BaseException] | None = None,
               exc_value: BaseException | None = None, tb: Any = None) -> None:
    """RQ's failure callback: the job raised, timed out, or was abandoned by a dead worker."""
    settings = get_settings()
    if isinstance(exc_value, JobFailed):
        event = {"canceled": "canceled", "expired": "expired"}.get(exc_value.code, "ask_error")
        end_job(job, connection, event, exc_value.code, exc_value.message)
    elif isinstance(exc_value, AbandonedJobError):
        end_job(job, connection, "worker_lost", "worker_lost", WORKER_LOST.format(why="its worker stopped answering"))
    elif isinstance(exc_value, JobTimeoutException):
        end_job(job, connection, "ask_error", "timeout", f"claude timed out after {settings.job_timeout_s} s")
    else:
        log.error("job %s failed unexpectedly: %r", job.id, exc_value)
        end_job(job, connection, "ask_error", "internal_error", "the worker failed unexpectedly; please ask again")


def on_stopped(job: Job, connection: redis.Redis) -> None:
    """RQ's stopped callback (DELETE on a running job): the horse and its claude are already dead."""
    end_job(job, connection, "canceled", "canceled", "stopped at your request")


def on_horse_killed(job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
    """The work-horse died outside Python (SIGKILL, OOM): on_failure will not run, so end the job here."""
    why = f"killed by signal {os.WTERMSIG(ret_val)}" if os.WIFSIGNALED(ret_val) else f"exit status {ret_val}"
    end_job(job, job.connection, "worker_lost", "worker_lost", WORKER_LOST.format(why=f"process {why}"))
