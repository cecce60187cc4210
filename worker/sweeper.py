"""Expire asks that waited queued past their TTL: RQ drops them silently, so no callback ever runs.

Run by every worker's maintenance; ZREM decides which worker handles each job, so it happens once.
"""

from __future__ import annotations

import json
import logging
import time
from typing import cast

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from shared.admission import LeaseRef, SyncAdmission
from shared.audit import AuditLog
from shared.keys import Keys, rq_job_key, rq_queue_key
from shared.settings import Settings

log = logging.getLogger("agent.sweeper")
GRACE_MS = 2000  # RQ's own key expiry normally comes first; after this, the sweep expires the job itself


def server_ms(conn: redis.Redis) -> int:
    seconds, micros = conn.time()
    return int(seconds) * 1000 + int(micros) // 1000


def sweep_expired(conn: redis.Redis, settings: Settings) -> int:
    """Expire every ask past its queue deadline; returns how many this call expired."""
    keys = Keys(settings.key_prefix)
    now = server_ms(conn)
    due = cast(list[tuple[bytes, float]], conn.zrangebyscore(keys.deadlines(), "-inf", now, withscores=True))
    expired = 0
    for raw_member, deadline in due:
        member = raw_member.decode()
        ref = LeaseRef.from_deadline_member(member)
        status = cast(bytes | None, conn.hget(rq_job_key(ref.job_id), "status"))
        if status is not None and status != b"queued":
            conn.zrem(keys.deadlines(), member)  # it started: the worker owns it now
            continue
        if status is not None and now < deadline + GRACE_MS:
            continue
        if not conn.zrem(keys.deadlines(), member):
            continue  # another worker took it
        expire(conn, settings, keys, ref, deadline)
        expired += 1
    return expired


def expire(conn: redis.Redis, settings: Settings, keys: Keys, ref: LeaseRef, deadline_ms: float) -> None:
    tombstone = {
        "user": ref.user, "session_id": ref.session_id, "status": "expired",
        "error": {"code": "expired",
                  "message": f"your question waited more than {settings.queue_ttl_s} s in the queue; please ask again"},
        "ended_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(deadline_ms / 1000)),
    }
    conn.set(keys.tombstone(ref.job_id), json.dumps(tombstone), ex=settings.result_ttl_s)
    try:
        Job.fetch(ref.job_id, connection=conn, serializer=JSONSerializer).delete()
    except NoSuchJobError:
        conn.lrem(rq_queue_key(settings.queue), 0, ref.job_id)
    SyncAdmission(settings, conn).release(ref)
    AuditLog(settings.audit_log).terminal(
        conn, keys, settings.failure_ttl_s, "expired", ref.job_id, user=ref.user, session_id=ref.session_id,
        queue_ttl_s=settings.queue_ttl_s,
    )
    log.info("expired job %s of %s after %s s queued", ref.job_id, ref.user, settings.queue_ttl_s)
