"""What ops need beside systemd: queue and worker status, and draining before a deploy."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import redis
from rq import Queue, Worker
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from shared.keys import Keys
from shared.settings import Settings


def _age_s(when: datetime | None) -> float | None:
    if when is None:
        return None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return round((datetime.now(UTC) - when).total_seconds(), 1)


def collect_status(settings: Settings, conn: redis.Redis) -> dict[str, Any]:
    queue = Queue(settings.queue, connection=conn, serializer=JSONSerializer)
    oldest_id = queue.get_job_ids(0, 1)
    oldest = Job.fetch(oldest_id[0], connection=conn, serializer=JSONSerializer) if oldest_id else None
    running = []
    registry = StartedJobRegistry(queue=queue)
    for job in Job.fetch_many(registry.get_job_ids(), connection=conn, serializer=JSONSerializer):
        if job is None:
            continue
        running.append({"job_id": job.id, "user": job.meta.get("user"), "session_id": job.meta.get("session_id"),
                        "worker": job.worker_name, "age_s": _age_s(job.started_at),
                        "progress": job.meta.get("progress")})
    workers = [
        {"name": w.name, "state": str(w.state), "current_job": w.get_current_job_id(),
         "successful": w.successful_job_count, "failed": w.failed_job_count}
        for w in Worker.all(queue=queue)
    ]
    return {
        "queue": settings.queue,
        "draining": bool(conn.exists(Keys(settings.key_prefix).draining())),
        "queued": queue.count,
        "oldest_queued_age_s": _age_s(oldest.enqueued_at) if oldest else None,
        "running": running,
        "failed": queue.failed_job_registry.count,
        "workers": workers,
    }


def print_status(settings: Settings, as_json: bool = False) -> int:
    conn = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3)
    try:
        status = collect_status(settings, conn)
    except redis.RedisError as exc:
        print(f"redis at {settings.redis_url.split('@')[-1]} is not answering: {exc}")
        return 1
    if as_json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    print(f"queue {status['queue']}: {status['queued']} queued (oldest {status['oldest_queued_age_s']} s), "
          f"{len(status['running'])} running, {status['failed']} failed{', DRAINING' if status['draining'] else ''}")
    for job in status["running"]:
        print(f"  running {job['job_id']} user={job['user']} worker={job['worker']} age={job['age_s']} s")
    print(f"{len(status['workers'])} workers")
    for w in status["workers"]:
        print(f"  {w['name']}: {w['state']} job={w['current_job'] or '-'} ok={w['successful']} failed={w['failed']}")
    return 0


def drain(settings: Settings, undo: bool = False, wait_s: float = 0.0) -> int:
    """Set (or clear) the draining flag that makes admission answer 503; optionally wait for the queue
    and the running jobs to empty. Returns 0 when drained (or not waiting), 1 on timeout."""
    conn = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3)
    key = Keys(settings.key_prefix).draining()
    if undo:
        conn.delete(key)
        print("admitting asks again")
        return 0
    conn.set(key, str(time.time()))
    print("draining: new asks get 503 until `overlord-agent drain --undo`")
    deadline = time.monotonic() + wait_s
    while True:
        status = collect_status(settings, conn)
        busy = status["queued"] + len(status["running"])
        if busy == 0:
            print("drained: nothing queued or running")
            return 0
        if time.monotonic() >= deadline:
            if wait_s:
                print(f"still busy after {wait_s} s: {status['queued']} queued, {len(status['running'])} running")
            return 0 if not wait_s else 1
        time.sleep(1.0)
