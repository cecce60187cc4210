"""A Redis the test starts itself (with AOF, like a production Redis) restarts while a job runs."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import SettingsFactory
from tests.lifecycle import Client, assert_no_leftovers, claude_pids, terminal_events
from tests.support import Proc, free_port, make_cookie, redis_server_binary, start_api, start_worker, wait_until


class OwnRedis:
    """A redis-server child on a free port, persisted to an append-only file so a restart keeps its data."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = redis_server_binary()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        conn = redis.Redis.from_url(self.url)
        wait_until(lambda: _pings(conn), 10, what="own redis to answer")
        conn.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _pings(conn: redis.Redis) -> bool:
    try:
        return bool(conn.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "redis")
    server.workdir.mkdir()
    server.start()
    yield server
    server.stop()


def test_redis_restart_while_a_job_runs_loses_nothing(
    make_settings: SettingsFactory, own_redis: OwnRedis, tmp_path: Path, procs: list[Proc], pid_dir: Path
) -> None:
    s = make_settings(redis_url=own_redis.url)
    api, base = start_api(s, tmp_path)
    procs.append(api)
    procs.append(start_worker(s, tmp_path, "survivor", {"FAKE_CLAUDE_PIDFILE_DIR": str(pid_dir)}))
    client = Client(base, make_cookie("alice"))
    session = client.new_session()
    job_id = client.ask(session, "[[sleep 4]] survive a restart")
    client.wait_status(job_id, "started")
    wait_until(lambda: claude_pids(pid_dir), 10, what="claude to start")
    own_redis.stop()
    down = client.http.get(f"/agent/jobs/{job_id}")
    assert down.status_code == 503 and down.json()["code"] == "redis_unavailable"
    own_redis.start()
    body = client.wait_done(job_id, 30)
    assert body["status"] == "finished", body
    assert body["result"]["result"] == "FAKE REPLY #1 to: [[sleep 4]] survive a restart"
    assert terminal_events(s.audit_log, job_id) == ["ask_ok"]
    conn = redis.Redis.from_url(own_redis.url)
    assert_no_leftovers(conn, "alice", session, pid_dir)
    assert client.wait_done(client.ask(session, "and after it"))["status"] == "finished"
    assert api.alive() and procs[1].alive(), "neither the API nor the worker died with Redis"
    conn.close()
    client.close()
