"""The floor: the least an endpoint of this stack can cost (FastAPI and one async Redis GET).

Served exactly as `overlord-agent api` serves the API (shared/cli.py `cmd_api`): one uvicorn process,
the same `uvicorn.run` options, access log on. Run: `python -m bench.floor --port 8800`.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI, Request

from bench.common import REDIS_URL

# The options shared/cli.py passes to uvicorn.run for the API; keep them equal so the comparison is fair.
UVICORN_OPTIONS: dict[str, object] = {"log_level": "info", "proxy_headers": True, "server_header": False}
# uvicorn's pure-Python stack, as the API was served before uvloop and httptools were installed (bench/whatif.py).
PLAIN_HTTP: dict[str, object] = {"loop": "asyncio", "http": "h11"}


def create_app(redis_url: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = aioredis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2)
        try:
            yield
        finally:
            await app.state.redis.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/floor")
    async def floor(request: Request) -> dict[str, str | None]:
        value = await request.app.state.redis.get("bench:floor")
        return {"value": value.decode() if value else None}

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--port", type=int, default=8800)
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--plain", action="store_true", help="asyncio's loop and h11, not uvloop and httptools")
    args = parser.parse_args(argv)
    options = UVICORN_OPTIONS | (PLAIN_HTTP if args.plain else {})
    uvicorn.run(create_app(args.redis_url), host="127.0.0.1", port=args.port, **options)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
