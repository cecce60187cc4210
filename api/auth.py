"""Who is calling: pluggable by AGENT_AUTH_MODE (signed cookie, issuer introspection, loopback dev)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
from typing import Protocol

import httpx
import itsdangerous
import redis.asyncio as aioredis
from starlette.requests import HTTPConnection

from shared.errors import AuthUnavailable, NotAuthenticated
from shared.keys import Keys
from shared.settings import Settings

log = logging.getLogger("agent.auth")

USER_NAME = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")


def valid_user(value: object) -> str:
    if isinstance(value, str) and USER_NAME.match(value) and value.strip():
        return value
    raise NotAuthenticated("the session does not name a user")


class Authenticator(Protocol):
    async def user(self, conn: HTTPConnection) -> str:
        """The signed-in user's name, or raise NotAuthenticated / AuthUnavailable."""
        ...


class SignedCookieAuth:
    """dereth-tracker's Starlette SessionMiddleware cookie: base64 JSON signed with itsdangerous TimestampSigner."""

    def __init__(self, settings: Settings) -> None:
        self.cookie_name = settings.cookie_name
        self.max_age_s = settings.session_max_age_s
        self.user_key = settings.session_user_key
        self.signer = itsdangerous.TimestampSigner(settings.session_secret.get_secret_value())

    async def user(self, conn: HTTPConnection) -> str:
        cookie = conn.cookies.get(self.cookie_name)
        if not cookie:
            raise NotAuthenticated("not signed in")
        try:
            payload = self.signer.unsign(cookie.encode(), max_age=self.max_age_s)
        except itsdangerous.SignatureExpired:
            raise NotAuthenticated("the session has expired; sign in again") from None
        except itsdangerous.BadSignature:
            raise NotAuthenticated("the session cookie is not valid") from None
        try:
            session = json.loads(base64.b64decode(payload))
        except (binascii.Error, ValueError):
            raise NotAuthenticated("the session cookie is not valid") from None
        if not isinstance(session, dict):
            raise NotAuthenticated("the session cookie is not valid")
        return valid_user(session.get(self.user_key))


class IntrospectAuth:
    """Forwards the cookie to the issuer's who-am-I URL; answers are cached briefly in Redis by cookie hash."""

    def __init__(self, settings: Settings, client: httpx.AsyncClient, cache: aioredis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.cache = cache
        self.keys = Keys(settings.key_prefix)

    async def user(self, conn: HTTPConnection) -> str:
        s = self.settings
        cookie = conn.cookies.get(s.cookie_name)
        if not cookie:
            raise NotAuthenticated("not signed in")
        cache_key = self.keys.auth_cache(hashlib.sha256(cookie.encode()).hexdigest())
        cached = await self.cache.get(cache_key) if s.auth_cache_s else None
        if cached:
            return cached.decode() if isinstance(cached, bytes) else str(cached)
        try:
            reply = await self.client.get(s.auth_url, headers={"Cookie": f"{s.cookie_name}={cookie}"},
                                          timeout=s.auth_timeout_s)
        except httpx.HTTPError as exc:
            log.warning("issuer %s unreachable: %s", s.auth_url, exc)
            raise AuthUnavailable("the sign-in service is not answering; try again shortly", retry_after_s=5) from None
        if reply.status_code in (401, 403):
            raise NotAuthenticated("the session is not valid; sign in again")
        if reply.status_code != 200:
            raise AuthUnavailable(f"the sign-in service answered {reply.status_code}", retry_after_s=5)
        try:
            body = reply.json()
        except ValueError:
            raise AuthUnavailable("the sign-in service answered something unreadable", retry_after_s=5) from None
        user = valid_user(body.get(s.session_user_key) if isinstance(body, dict) else None)
        if s.auth_cache_s:
            await self.cache.set(cache_key, user, ex=s.auth_cache_s)
        return user


class DevAuth:
    """Local development only (settings refuse it off loopback): everyone is AGENT_DEV_USER,
    or the name in a `dev_user` cookie, so a tester can act as several users."""

    def __init__(self, settings: Settings) -> None:
        self.default_user = settings.dev_user

    async def user(self, conn: HTTPConnection) -> str:
        return valid_user(conn.cookies.get("dev_user") or self.default_user)


def build_authenticator(settings: Settings, http: httpx.AsyncClient, cache: aioredis.Redis) -> Authenticator:
    if settings.auth_mode == "signed":
        return SignedCookieAuth(settings)
    if settings.auth_mode == "introspect":
        return IntrospectAuth(settings, http, cache)
    return DevAuth(settings)
