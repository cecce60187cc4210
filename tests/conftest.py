"""Fixtures: real Redis flushed per test (DB 9 by default), settings in a temp dir, app and process factories."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from shared.settings import DEFAULT_ENV_PASSTHROUGH, Settings
from tests.support import FAKE_CLAUDE, REDIS_URL, SECRET, Proc, make_cookie, start_api, start_worker

SettingsFactory = Callable[..., Settings]

# Settings are built explicitly by the tests: a developer's AGENT_* environment must not leak into them.
for _name in [n for n in os.environ if n.startswith("AGENT_") and n != "AGENT_TEST_REDIS_URL"]:
    del os.environ[_name]


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Real Redis must answer: the test command starts one; a missing Redis fails, it never skips."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(f"no Redis at {REDIS_URL} ({exc}): run the tests with `make test` / scripts/test")
    return REDIS_URL


@pytest.fixture
def rconn(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    yield conn
    conn.flushdb()
    conn.close()


@pytest.fixture
def pid_dir(tmp_path: Path) -> Path:
    path = tmp_path / "claude-pids"
    path.mkdir()
    return path


@pytest.fixture
def make_settings(tmp_path: Path, redis_url: str) -> SettingsFactory:
    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "session_secret": SECRET,
            "audit_log": tmp_path / "audit.jsonl",
            "claude_bin": str(FAKE_CLAUDE),
            "claude_cwd": tmp_path / "work",
            "claude_config_dir": tmp_path / "claude",
            "worker_ttl_s": 10,
            "maintenance_interval_s": 1,
            "job_monitoring_interval_s": 1,
            "lease_ttl_s": 6,
            # the test hooks of tests/fake_claude.py must cross the worker's minimal environment
            "claude_env_passthrough": [*DEFAULT_ENV_PASSTHROUGH, "FAKE_CLAUDE_PIDFILE_DIR", "FAKE_CLAUDE_LOG"],
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return factory


@pytest.fixture
def settings(make_settings: SettingsFactory, rconn: redis.Redis) -> Settings:
    return make_settings()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def alice() -> dict[str, str]:
    return {"session": make_cookie("alice")}


@pytest.fixture
def bob() -> dict[str, str]:
    return {"session": make_cookie("bob")}


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Every process a test starts goes here and is stopped (with its process group) at teardown."""
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def stack(settings: Settings, tmp_path: Path, procs: list[Proc], pid_dir: Path) -> Callable[..., str]:
    """Start a real API process and `workers` real `overlord-agent worker` processes; returns the base URL."""

    def start(workers: int = 1, settings_: Settings | None = None) -> str:
        s = settings_ or settings
        api, base = start_api(s, tmp_path)
        procs.append(api)
        for n in range(workers):
            procs.append(start_worker(s, tmp_path, f"w{n + 1}-{tmp_path.name[-8:]}",
                                      {"FAKE_CLAUDE_PIDFILE_DIR": str(pid_dir)}))
        return base

    return start
