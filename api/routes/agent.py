"""Health, who-am-I, sessions and their history."""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import redis
from fastapi import APIRouter

from api.deps import ContextDep, CurrentUser, OriginGuard
from shared.errors import NotFound
from shared.keys import rq_queue_key
from shared.models import Health, History, Me, NewSession
from shared.transcript import read_history, transcript_path

router = APIRouter(prefix="/agent")


@router.get("/health", response_model=Health)
async def health(ctx: ContextDep) -> Health:
    """Liveness for deploy scripts: no auth, no host paths or secrets."""
    try:
        async with ctx.redis.pipeline(transaction=False) as pipe:
            pipe.scard(f"rq:workers:{ctx.settings.queue}")
            pipe.llen(rq_queue_key(ctx.settings.queue))
            workers, queued = await pipe.execute()
    except redis.RedisError:
        return Health(status="degraded", redis=False, workers=0, queued=0, demo=ctx.settings.claude_demo)
    return Health(status="ok", redis=True, workers=workers, queued=queued, demo=ctx.settings.claude_demo)


@router.get("/me", response_model=Me)
async def me(user: CurrentUser) -> Me:
    return Me(user=user)


@router.post("/sessions/new", response_model=NewSession, dependencies=[OriginGuard])
async def new_session(ctx: ContextDep, user: CurrentUser) -> NewSession:
    """A fresh conversation owned by the caller (the CLI creates its transcript on the first turn)."""
    session_id = str(uuid.uuid4())
    await ctx.redis.set(ctx.keys.session_owner(session_id), user, px=ctx.settings.session_owner_ttl_s * 1000)
    return NewSession(session_id=session_id)


async def claim_session(ctx: ContextDep, user: str, session_id: str) -> None:
    """Check ownership; a session with no owner on record is claimed by its first user, atomically.

    SET NX then GET in one MULTI, not `SET NX GET`: that needs Redis 7 and the embedded server is 6.2."""
    key = ctx.keys.session_owner(session_id)
    async with ctx.redis.pipeline(transaction=True) as pipe:
        pipe.set(key, user, nx=True, px=ctx.settings.session_owner_ttl_s * 1000)
        pipe.get(key)
        _, owner = await pipe.execute()
    if (owner.decode() if isinstance(owner, bytes) else owner) != user:
        raise NotFound("no such session")


@router.get("/sessions/{session_id}/history", response_model=History)
async def history(session_id: uuid.UUID, ctx: ContextDep, user: CurrentUser) -> History:
    """The owner's transcript replayed as chat messages; [] for a session with no turns yet."""
    sid = str(session_id)
    await claim_session(ctx, user, sid)
    path: Path = transcript_path(ctx.settings.claude_config_dir, ctx.settings.claude_cwd, sid)
    messages = await anyio.to_thread.run_sync(read_history, path)
    return History.model_validate({"messages": messages})
