"""Admission and leases: atomic Lua scripts shared by every API process and worker.

One ask costs one script call: trim, check, record. A lease's member is the job id (its owner token)
and its score is its expiry in ms by Redis `TIME`, so no process clock matters. Every key touched
gets a TTL; release is idempotent and only by the owner token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from shared.errors import ConcurrencyLimited, Draining, NotFound, QueueFull, RateLimited, SessionBusy
from shared.keys import Keys, rq_queue_key
from shared.settings import Settings

# KEYS: 1 rate zset, 2 leases zset, 3 session lock, 4 session owner, 5 RQ queue list, 6 deadlines zset,
#       7 draining flag
# ARGV: 1 user, 2 job id, 3 rate max, 4 window ms, 5 concurrency cap, 6 lease ttl ms, 7 max queued,
#       8 owner ttl ms, 9 queue wait ttl ms, 10 deadline member (job|session|user)
# Returns {"ok", now_ms, jobs queued ahead} or {refusal, detail}: not_found, session_busy <job>,
#       concurrency <job>, rate <retry_after_ms>, queue_full, draining.
ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local user, job = ARGV[1], ARGV[2]
local owner = redis.call('GET', KEYS[4])
if owner and owner ~= user then return {'not_found', ''} end
if redis.call('EXISTS', KEYS[7]) == 1 then return {'draining', ''} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[4]))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local holder = redis.call('GET', KEYS[3])
if holder then return {'session_busy', holder} end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then
  return {'concurrency', redis.call('ZRANGE', KEYS[2], 0, 0)[1]}
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {'rate', tostring(tonumber(oldest[2]) + tonumber(ARGV[4]) - now)}
end
if redis.call('LLEN', KEYS[5]) >= tonumber(ARGV[7]) then return {'queue_full', ''} end
local lease_ttl = tonumber(ARGV[6])
redis.call('ZADD', KEYS[1], now, job)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], now + lease_ttl, job)
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[2], math.max(1, tonumber(last[2]) - now))
redis.call('SET', KEYS[3], job, 'PX', lease_ttl)
redis.call('SET', KEYS[4], user, 'PX', ARGV[8])
redis.call('ZADD', KEYS[6], now + tonumber(ARGV[9]), ARGV[10])
local due = redis.call('ZRANGE', KEYS[6], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[6], math.max(1, tonumber(due[2]) - now + lease_ttl))
return {'ok', tostring(now), redis.call('LLEN', KEYS[5])}
"""

# KEYS: 1 leases zset, 2 session lock, 3 deadlines zset
# ARGV: 1 job id (owner token), 2 new ttl ms, 3 deadline member
# Renews the lease (re-creating it when Redis lost it); returns 1 renewed, 2 re-created,
# 0 when the session is held by another job (this job lost its lease for good).
RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local job, ttl = ARGV[1], tonumber(ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[3])
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= job then return 0 end
local had = redis.call('ZSCORE', KEYS[1], job)
redis.call('ZADD', KEYS[1], now + ttl, job)
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[1], math.max(1, tonumber(last[2]) - now))
redis.call('SET', KEYS[2], job, 'PX', ttl)
if had then return 1 end
return 2
"""

# KEYS: 1 leases zset, 2 session lock, 3 deadlines zset, 4 rate zset (only when refunding)
# ARGV: 1 job id (owner token), 2 "refund" to also take the ask back from the rate window, 3 deadline member
# Idempotent: returns how many of lease, lock, (rate entry) this call removed.
RELEASE_LUA = """
local job = ARGV[1]
local n = redis.call('ZREM', KEYS[1], job)
if redis.call('GET', KEYS[2]) == job then n = n + redis.call('DEL', KEYS[2]) end
redis.call('ZREM', KEYS[3], ARGV[3])
if ARGV[2] == 'refund' then n = n + redis.call('ZREM', KEYS[4], job) end
return n
"""


@dataclass(frozen=True)
class LeaseRef:
    """Everything needed to renew or release one ask's lease: who, which session, which job."""

    user: str
    session_id: str
    job_id: str

    @property
    def deadline_member(self) -> str:
        """The member of the deadlines zset: enough to expire the job after RQ has forgotten it."""
        return f"{self.job_id}|{self.session_id}|{self.user}"

    @classmethod
    def from_deadline_member(cls, member: str) -> LeaseRef:
        job_id, session_id, user = member.split("|", 2)
        return cls(user=user, session_id=session_id, job_id=job_id)


class Admission:
    """The scripts bound to one client (sync in workers, async in the API)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)

    def admit_keys_args(self, ref: LeaseRef) -> tuple[list[str], list[Any]]:
        s, k = self.settings, self.keys
        keys = [
            k.rate(ref.user),
            k.leases(ref.user),
            k.session_lock(ref.session_id),
            k.session_owner(ref.session_id),
            rq_queue_key(s.queue),
            k.deadlines(),
            k.draining(),
        ]
        args: list[Any] = [
            ref.user,
            ref.job_id,
            s.rate_max,
            s.rate_window_s * 1000,
            s.concurrency_per_user,
            s.queued_lease_ttl_ms,
            s.max_queued,
            s.session_owner_ttl_s * 1000,
            s.queue_ttl_s * 1000,
            ref.deadline_member,
        ]
        return keys, args

    def release_keys(self, ref: LeaseRef) -> list[str]:
        k = self.keys
        return [k.leases(ref.user), k.session_lock(ref.session_id), k.deadlines(), k.rate(ref.user)]

    @staticmethod
    def release_args(ref: LeaseRef, refund: bool) -> list[str]:
        return [ref.job_id, "refund" if refund else "", ref.deadline_member]

    def renew_keys(self, ref: LeaseRef) -> list[str]:
        k = self.keys
        return [k.leases(ref.user), k.session_lock(ref.session_id), k.deadlines()]

    @staticmethod
    def check(reply: list[Any]) -> int:
        """Turn the admit script's reply into the job's expected queue position, or raise the refusal."""
        verdict, detail = _text(reply[0]), _text(reply[1])
        if verdict == "ok":
            return max(0, int(reply[2]))
        if verdict == "not_found":
            raise NotFound("no such session")
        if verdict == "session_busy":
            raise SessionBusy("this conversation is still answering a previous question", job_id=detail)
        if verdict == "concurrency":
            raise ConcurrencyLimited("another of your questions is still queued or running", job_id=detail)
        if verdict == "rate":
            retry_s = max(1, math.ceil(int(detail) / 1000))
            raise RateLimited(f"rate limit reached; retry in {retry_s} s", retry_after_s=retry_s)
        if verdict == "queue_full":
            raise QueueFull("the queue is full; try again shortly", retry_after_s=30)
        if verdict == "draining":
            raise Draining("the service is being updated; try again shortly", retry_after_s=30)
        raise RuntimeError(f"unexpected admission reply {reply!r}")


class AsyncAdmission(Admission):
    """Admission for the API (redis.asyncio)."""

    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        super().__init__(settings)
        self._admit = client.register_script(ADMIT_LUA)
        self._release = client.register_script(RELEASE_LUA)

    async def admit(self, ref: LeaseRef) -> int:
        keys, args = self.admit_keys_args(ref)
        return self.check(await self._admit(keys=keys, args=args))

    async def release(self, ref: LeaseRef, *, refund: bool = False) -> int:
        return int(await self._release(keys=self.release_keys(ref), args=self.release_args(ref, refund)))


class SyncAdmission(Admission):
    """Lease renewal and release for the workers (sync redis, as RQ uses)."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        super().__init__(settings)
        self._release = client.register_script(RELEASE_LUA)
        self._renew = client.register_script(RENEW_LUA)
        self._admit = client.register_script(ADMIT_LUA)

    def admit(self, ref: LeaseRef) -> int:
        keys, args = self.admit_keys_args(ref)
        return self.check(self._admit(keys=keys, args=args))

    def renew(self, ref: LeaseRef) -> int:
        args: list[str | int] = [ref.job_id, self.settings.lease_ttl_ms, ref.deadline_member]
        return int(self._renew(keys=self.renew_keys(ref), args=args))

    def release(self, ref: LeaseRef, *, refund: bool = False) -> int:
        return int(self._release(keys=self.release_keys(ref), args=self.release_args(ref, refund)))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
