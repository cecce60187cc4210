"""Every Redis key this service owns, built in one place (RQ's own keys stay RQ's).

Units: all TTLs and scores are milliseconds since the epoch, as Redis `TIME` gives them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key builders under one prefix, so the API, the workers and the tests cannot drift."""

    prefix: str = "agent:"

    def rate(self, user: str) -> str:
        """ZSET: one member per admitted ask (the job id), scored by admission time (ms)."""
        return f"{self.prefix}rate:{user}"

    def leases(self, user: str) -> str:
        """ZSET: the user's live leases; member = job id (the owner token), score = expiry (ms)."""
        return f"{self.prefix}leases:{user}"

    def session_lock(self, session_id: str) -> str:
        """STRING: the job id holding the session's single turn in flight (PX = lease expiry)."""
        return f"{self.prefix}slock:{session_id}"

    def session_owner(self, session_id: str) -> str:
        """STRING: the user who owns the session."""
        return f"{self.prefix}owner:{session_id}"

    def deadlines(self) -> str:
        """ZSET: queued job ids scored by the time their queue wait expires (ms); the expiry sweep reads it."""
        return f"{self.prefix}deadlines"

    def tombstone(self, job_id: str) -> str:
        """STRING (JSON): what the poller shows for a job RQ no longer holds (canceled while queued, expired)."""
        return f"{self.prefix}gone:{job_id}"

    def audit_end(self, job_id: str) -> str:
        """STRING: set once when the job's terminal audit line is written (exactly one per job)."""
        return f"{self.prefix}auditend:{job_id}"

    def auth_cache(self, cookie_hash: str) -> str:
        """STRING: the user name an introspection answered for this cookie hash."""
        return f"{self.prefix}auth:{cookie_hash}"

    def draining(self) -> str:
        """STRING: present while ops drain the service: the API admits nothing new."""
        return f"{self.prefix}draining"

    def pattern(self) -> str:
        return f"{self.prefix}*"


def rq_job_key(job_id: str) -> str:
    """RQ's job hash (rq.job.Job.key_for), read directly by the poller in one round trip."""
    return f"rq:job:{job_id}"


def rq_results_key(job_id: str) -> str:
    """RQ's results stream (rq.results.Result.get_key): one entry per end of the job."""
    return f"rq:results:{job_id}"


def rq_queue_key(queue: str) -> str:
    """RQ's queue list (rq.queue.Queue.key)."""
    return f"rq:queue:{queue}"
