"""The old design, as a baseline: `claude` runs inside the HTTP request.

As in the original service (/work/shared/reference/original-service.txt): one subprocess per ask awaited
in the request, a per-user `asyncio.Semaphore` and a rolling rate window in process memory, 429 when the
user already has an ask in flight. Same signed-cookie check as the API (api.auth.SignedCookieAuth) and
the same uvicorn options (bench.floor.UVICORN_OPTIONS). A client that gives up does not stop the claude
run: Starlette keeps running the endpoint, as the original did.
Run: `python -m bench.oldservice --port 8801 --claude-bin bench/claude_stub.sh --config-dir DIR`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from api.auth import SignedCookieAuth
from bench.common import SECRET
from bench.floor import UVICORN_OPTIONS
from shared.settings import Settings

CLAUDE_TIMEOUT_S = 600.0


class AskRequest(BaseModel):
    session_id: str
    message: str = Field(min_length=1, max_length=10_000)


class AskResponse(BaseModel):
    result: str
    session_id: str
    duration_ms: int
    num_turns: int
    is_error: bool


def create_app(claude_bin: str, config_dir: Path, rate_max: int = 10**9, rate_window_s: float = 3600.0) -> FastAPI:
    auth = SignedCookieAuth(Settings(_env_file=None, session_secret=SECRET))
    rate_state: dict[str, deque[float]] = {}
    semaphores: dict[str, asyncio.Semaphore] = {}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CLAUDE_CONFIG_DIR": str(config_dir)}
    app = FastAPI()

    def check_rate(user: str) -> None:
        now = time.monotonic()
        window = rate_state.setdefault(user, deque())
        while window and window[0] < now - rate_window_s:
            window.popleft()
        if len(window) >= rate_max:
            raise HTTPException(429, "Rate limit exceeded")
        window.append(now)

    async def ask_claude(message: str, session_id: str) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            claude_bin, "-p", "--output-format", "json", "--session-id", session_id, "--", message,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            stdout, _ = await asyncio.wait_for(proc.communicate(), CLAUDE_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            raise HTTPException(502, "claude timed out") from None
        result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
        return result

    @app.post("/agent/ask", response_model=AskResponse)
    async def agent_ask(body: AskRequest, request: Request) -> AskResponse:
        user = await auth.user(request)
        check_rate(user)
        sem = semaphores.setdefault(user, asyncio.Semaphore(1))
        if sem.locked():
            raise HTTPException(429, "A previous question is still being processed")
        async with sem:
            res = await ask_claude(body.message, body.session_id)
        return AskResponse(result=res["result"], session_id=res["session_id"], duration_ms=res["duration_ms"],
                           num_turns=res["num_turns"], is_error=res["is_error"])

    @app.get("/agent/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.oldservice", description=__doc__)
    parser.add_argument("--port", type=int, default=8801)
    parser.add_argument("--claude-bin", required=True)
    parser.add_argument("--config-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    app = create_app(args.claude_bin, args.config_dir)
    uvicorn.run(app, host="127.0.0.1", port=args.port, **UVICORN_OPTIONS)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
