"""What the API holds for its lifetime: clients opened in the lifespan, passed to routes explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx
import redis.asyncio as aioredis
from redis import Redis as SyncRedis
from redis.commands.core import AsyncScript
from rq import Queue
from rq.serializers import JSONSerializer

from api.auth import Authenticator, build_authenticator
from api.enqueue import ENQUEUE_NEW_LUA
from shared.admission import AsyncAdmission
from shared.audit import AuditLog
from shared.keys import Keys
from shared.settings import Settings


@dataclass
class AppContext:
    settings: Settings
    redis: aioredis.Redis  # the request path (admission, polls)
    rq_redis: SyncRedis  # RQ's own client (enqueue, cancel, stop)
    queue: Queue
    http: httpx.AsyncClient
    admission: AsyncAdmission
    audit: AuditLog
    auth: Authenticator
    keys: Keys
    enqueue_new: AsyncScript  # api/enqueue.py

    @classmethod
    def open(cls, settings: Settings) -> AppContext:
        client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
        rq_client = SyncRedis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
        # A jar that keeps nothing: the client is shared by every user, so an issuer's Set-Cookie for one
        # user must never ride along with the next user's introspection.
        http = httpx.AsyncClient(follow_redirects=False, cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])))
        return cls(
            settings=settings,
            redis=client,
            rq_redis=rq_client,
            queue=Queue(settings.queue, connection=rq_client, serializer=JSONSerializer),
            http=http,
            admission=AsyncAdmission(settings, client),
            audit=AuditLog(settings.audit_log),
            auth=build_authenticator(settings, http, client),
            keys=Keys(settings.key_prefix),
            enqueue_new=client.register_script(ENQUEUE_NEW_LUA),
        )

    async def close(self) -> None:
        await self.http.aclose()
        await self.redis.aclose()
        self.rq_redis.close()
