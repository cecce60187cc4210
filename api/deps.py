"""Named dependencies: the app context, the signed-in user, the same-origin guard.

All are `async def`: a plain `def` dependency costs a thread-pool hop per request (bench/RESULTS.md)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.context import AppContext
from shared.errors import CrossOriginRefused


async def get_context(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


ContextDep = Annotated[AppContext, Depends(get_context)]


async def current_user(request: Request, ctx: ContextDep) -> str:
    return await ctx.auth.user(request)


CurrentUser = Annotated[str, Depends(current_user)]


async def same_origin_or_allowed(request: Request, ctx: ContextDep) -> None:
    """Refuse a state-changing request that a browser sent from another site (403).

    The API's own scheme://host:port is always allowed (browsers send Origin on same-origin POSTs too).
    """
    origin = request.headers.get("origin")
    if origin is None:
        if request.headers.get("sec-fetch-site") == "cross-site":
            raise CrossOriginRefused("cross-site requests are not allowed")
        return
    origin = origin.rstrip("/")
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    if origin == own or origin in ctx.settings.allowed_origins:
        return
    raise CrossOriginRefused(f"requests from {origin} are not allowed")


OriginGuard = Depends(same_origin_or_allowed)
