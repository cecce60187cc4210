"""The API app: a factory and its lifespan (clients opened here, closed on shutdown)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from api import dashboard, errors
from api.context import AppContext
from api.limits import BodyLimit
from api.routes import agent, jobs
from shared.models import ErrorBody
from shared.settings import Settings, get_settings

STATIC_DIR = Path(__file__).parent / "static"
log = logging.getLogger("agent.api")

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 409, 422, 429, 503)
}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx = AppContext.open(settings)
        app.state.ctx = ctx
        log.info("api ready: auth=%s queue=%s demo=%s", settings.auth_mode, settings.queue, settings.claude_demo)
        try:
            yield
        finally:
            await ctx.close()

    app = FastAPI(title="overlord-agent", version="0.2.0", lifespan=lifespan, responses=ERROR_RESPONSES,
                  docs_url="/agent/docs", redoc_url=None, openapi_url="/agent/openapi.json")
    errors.install(app)
    app.add_middleware(BodyLimit)
    app.include_router(agent.router)
    app.include_router(jobs.router)
    app.include_router(dashboard.router(settings))

    @app.get("/agent", include_in_schema=False)
    async def _slash() -> RedirectResponse:
        return RedirectResponse("/agent/")

    @app.get("/agent/", include_in_schema=False)
    async def _page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/agent/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    return app
