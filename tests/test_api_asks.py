"""Asking, polling and canceling over HTTP with no worker running: admission, the queue, the keyspace left.

In-process tests use the `client` fixture; the limits under concurrency and Redis going down use real
API processes (`start_api`).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx
import httpx2
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from rq.exceptions import DuplicateJobError

from api.main import create_app
from shared.audit import MESSAGE_PREVIEW_CHARS
from shared.keys import Keys, rq_job_key, rq_queue_key
from shared.settings import Settings
from tests.support import (
    Proc,
    agent_keys,
    audit_lines,
    cookie_headers,
    free_port,
    lmembers,
    make_cookie,
    redis_ms,
    redis_server_binary,
    start_api,
    wait_until,
    zfirst,
    zmembers,
)

SettingsFactory = Callable[..., Settings]
K = Keys("agent:")
QUEUE = rq_queue_key("agent")


def as_user(user: str) -> dict[str, str]:
    return cookie_headers({"session": make_cookie(user)})


def ask(client: TestClient, user: str, session_id: str | None = None, message: str = "hello") -> httpx2.Response:
    body = {"session_id": session_id or str(uuid.uuid4()), "message": message}
    return client.post("/agent/ask", json=body, headers=as_user(user))


def position(client: TestClient, user: str, job_id: str) -> int:
    view = client.get(f"/agent/jobs/{job_id}", headers=as_user(user)).json()
    assert view["status"] == "queued"
    return int(view["position"])


def all_keys(conn: redis.Redis) -> set[str]:
    return {key.decode() for key in conn.scan_iter("*")}


# --- asking and polling without a worker --------------------------------------------------------------------


def test_ask_is_202_with_location_and_a_queued_job_at_position_0(client: TestClient, rconn: redis.Redis) -> None:
    session_id = str(uuid.uuid4())
    reply = ask(client, "alice", session_id)
    assert reply.status_code == 202
    body = reply.json()
    job_id = body["job_id"]
    assert body == {"job_id": job_id, "session_id": session_id, "status": "queued", "position": 0}
    assert reply.headers["location"] == f"/agent/jobs/{job_id}"
    assert rconn.lrange(QUEUE, 0, -1) == [job_id.encode()]
    polled = client.get(reply.headers["location"], headers=as_user("alice"))
    assert polled.status_code == 200
    view = polled.json()
    assert view["status"] == "queued" and view["position"] == 0 and view["session_id"] == session_id
    assert view["job_id"] == job_id and view["enqueued_at"]
    assert not {"result", "error", "started_at", "ended_at", "progress"} & set(view)


def test_successive_asks_from_different_users_are_queued_at_positions_0_1_2(client: TestClient) -> None:
    jobs = []
    for expected, user in enumerate(["alice", "bob", "carol"]):
        reply = ask(client, user)
        assert reply.status_code == 202 and reply.json()["position"] == expected
        jobs.append((user, reply.json()["job_id"]))
    assert [position(client, user, job_id) for user, job_id in jobs] == [0, 1, 2]
    first_user, first_job = jobs[0]
    assert client.delete(f"/agent/jobs/{first_job}", headers=as_user(first_user)).json()["status"] == "canceled"
    assert [position(client, user, job_id) for user, job_id in jobs[1:]] == [0, 1]


def test_canceling_a_queued_job_leaves_exactly_rate_owner_tombstone_and_audit_marker(
    client: TestClient, rconn: redis.Redis, settings: Settings
) -> None:
    session_id = str(uuid.uuid4())
    job_id = ask(client, "alice", session_id).json()["job_id"]

    first = client.delete(f"/agent/jobs/{job_id}", headers=as_user("alice"))
    assert first.status_code == 200
    view = first.json()
    assert view["status"] == "canceled" and view["error"]["code"] == "canceled"
    assert view["job_id"] == job_id and view["session_id"] == session_id
    again = client.delete(f"/agent/jobs/{job_id}", headers=as_user("alice"))
    assert again.status_code == 200 and again.json() == view
    polled = client.get(f"/agent/jobs/{job_id}", headers=as_user("alice"))
    assert polled.status_code == 200 and polled.json() == view

    expected = {K.rate("alice"), K.session_owner(session_id), K.tombstone(job_id), K.audit_end(job_id)}
    assert agent_keys(rconn) == expected
    assert all_keys(rconn) == expected | {"rq:queues"}  # RQ's registry of queue names
    assert not rconn.exists(rq_job_key(job_id)) and rconn.llen(QUEUE) == 0
    assert 0 < rconn.pttl(K.rate("alice")) <= settings.rate_window_s * 1000
    assert 0 < rconn.pttl(K.session_owner(session_id)) <= settings.session_owner_ttl_s * 1000
    assert 0 < rconn.pttl(K.tombstone(job_id)) <= settings.result_ttl_s * 1000
    assert 0 < rconn.pttl(K.audit_end(job_id)) <= settings.failure_ttl_s * 1000

    events = [(line["event"], line.get("job_id")) for line in audit_lines(settings.audit_log)]
    assert events == [("enqueued", job_id), ("canceled", job_id)]
    # the slot is free again: the same session takes a new turn
    assert ask(client, "alice", session_id).status_code == 202


def test_refusals_name_the_job_in_flight_and_are_audited_with_a_bounded_preview(
    make_settings: SettingsFactory, rconn: redis.Redis
) -> None:
    settings = make_settings(rate_max=2)
    long_message = "x" * 9_000 + "tail"
    with TestClient(create_app(settings)) as client:
        s1, s2, s3 = (str(uuid.uuid4()) for _ in range(3))
        held = ask(client, "alice", s1, long_message).json()["job_id"]

        busy = ask(client, "alice", s1, long_message)
        assert busy.status_code == 409
        assert busy.json() == {"detail": busy.json()["detail"], "code": "session_busy", "job_id": held}
        capped = ask(client, "alice", s2, long_message)
        assert capped.status_code == 429
        assert capped.json() == {"detail": capped.json()["detail"], "code": "concurrency_limited", "job_id": held}
        assert "retry-after" not in capped.headers

        client.delete(f"/agent/jobs/{held}", headers=as_user("alice"))
        second = ask(client, "alice", s2, long_message).json()["job_id"]
        client.delete(f"/agent/jobs/{second}", headers=as_user("alice"))
        limited = ask(client, "alice", s3, long_message)
        assert limited.status_code == 429 and limited.json()["code"] == "rate_limited"
        assert 0 < int(limited.headers["retry-after"]) <= settings.rate_window_s

    lines = audit_lines(settings.audit_log)
    assert [line["event"] for line in lines] == [
        "enqueued", "session_busy", "concurrency_blocked", "canceled", "enqueued", "canceled", "rate_limited",
    ]
    for line in lines:
        assert line["user"] == "alice" and line["session_id"] in (s1, s2, s3) and line["timestamp"]
        if "message" in line:
            assert 0 < len(line["message"]) <= MESSAGE_PREVIEW_CHARS and long_message.startswith(line["message"])
    enqueued, busy_line, capped_line, canceled, _, _, limited_line = lines
    assert enqueued["job_id"] == held and enqueued["message_len"] == len(long_message) and enqueued["position"] == 0
    assert (busy_line["session_id"], busy_line["blocking_job_id"]) == (s1, held)
    assert (capped_line["session_id"], capped_line["blocking_job_id"]) == (s2, held)
    assert canceled["job_id"] == held and canceled["stage"] == "queued"
    assert limited_line["session_id"] == s3 and limited_line["retry_after_s"] == int(limited.headers["retry-after"])


def test_long_poll_on_a_queued_job_answers_after_the_wait_with_status_queued(client: TestClient) -> None:
    job_id = ask(client, "alice").json()["job_id"]
    started = time.monotonic()
    reply = client.get(f"/agent/jobs/{job_id}", params={"wait": 2}, headers=as_user("alice"))
    elapsed = time.monotonic() - started
    assert reply.status_code == 200 and reply.json()["status"] == "queued"
    assert 1.9 <= elapsed < 3.5


def test_long_poll_returns_at_once_when_the_job_is_canceled_meanwhile(client: TestClient) -> None:
    job_id = ask(client, "alice").json()["job_id"]
    client.delete(f"/agent/jobs/{job_id}", headers=as_user("alice"))
    started = time.monotonic()
    reply = client.get(f"/agent/jobs/{job_id}", params={"wait": 20}, headers=as_user("alice"))
    assert reply.json()["status"] == "canceled" and time.monotonic() - started < 1


@pytest.mark.parametrize("wait", ["26", "-1", "nan", "soon"])
def test_wait_outside_0_to_25_seconds_is_422(client: TestClient, wait: str) -> None:
    job_id = ask(client, "alice").json()["job_id"]
    reply = client.get(f"/agent/jobs/{job_id}", params={"wait": wait}, headers=as_user("alice"))
    assert reply.status_code == 422
    assert reply.json()["code"] == "invalid_request" and "wait" in reply.json()["detail"]


# --- bad input ---------------------------------------------------------------------------------------------------

SESSION = "0b7b5c1e-3f51-4a0a-9d43-5b8d7c3c2a10"
BAD_BODIES: dict[str, str | bytes] = {
    "missing_message": '{"session_id": "' + SESSION + '"}',
    "missing_session_id": '{"message": "hi"}',
    "empty_object": "{}",
    "non_uuid_session_id": '{"session_id": "../../etc/passwd", "message": "hi"}',
    "session_id_not_a_string": '{"session_id": 42, "message": "hi"}',
    "blank_message": '{"session_id": "' + SESSION + '", "message": " \\n\\t "}',
    "empty_message": '{"session_id": "' + SESSION + '", "message": ""}',
    "too_long_message": '{"session_id": "' + SESSION + '", "message": "' + "a" * 10_001 + '"}',
    "nul_in_message": '{"session_id": "' + SESSION + '", "message": "a\\u0000b"}',
    "message_not_a_string": '{"session_id": "' + SESSION + '", "message": ["hi"]}',
    "malformed_json": '{"session_id": "' + SESSION + '", "message": "hi"',
    "not_an_object": '["hi"]',
    "extra_field": '{"session_id": "' + SESSION + '", "message": "hi", "model": "opus"}',
    "empty_body": "",
    "not_utf8": b'{"session_id": "' + SESSION.encode() + b'", "message": "\xff\xfe"}',
}


@pytest.mark.parametrize("kind", sorted(BAD_BODIES))
def test_bad_ask_body_is_422_invalid_request_with_a_string_detail(
    client: TestClient, rconn: redis.Redis, kind: str
) -> None:
    reply = client.post("/agent/ask", content=BAD_BODIES[kind],
                        headers=as_user("alice") | {"Content-Type": "application/json"})
    assert reply.status_code == 422, reply.text
    body = reply.json()
    assert body["code"] == "invalid_request"
    assert isinstance(body["detail"], str) and body["detail"]
    assert rconn.llen(QUEUE) == 0 and agent_keys(rconn) == set()


def test_longest_allowed_message_is_accepted(client: TestClient) -> None:
    assert ask(client, "alice", message="a" * 10_000).status_code == 202


@pytest.mark.parametrize("job_id", ["not-a-uuid", "1234", "%2e%2e", "0b7b5c1e3f514a0a9d435b8d7c3c2a1", "{job}x"])
def test_non_uuid_job_id_is_404_like_a_missing_job(client: TestClient, job_id: str) -> None:
    missing = client.get(f"/agent/jobs/{uuid.uuid4()}", headers=as_user("alice"))
    assert missing.status_code == 404
    real_job = ask(client, "alice").json()["job_id"]
    for method in ("GET", "DELETE"):
        reply = client.request(method, f"/agent/jobs/{job_id.format(job=real_job)}", headers=as_user("alice"))
        assert reply.status_code == 404, (method, reply.text)
        assert reply.json() == missing.json() == {"detail": "no such job", "code": "not_found"}


@pytest.mark.parametrize("job_id", ["%2e%2e%2fetc", "..%2F..%2Fagent%2Fhealth", "a%2Fb"])
def test_job_id_with_an_encoded_slash_is_404_not_found(client: TestClient, job_id: str) -> None:
    for method in ("GET", "DELETE"):
        reply = client.request(method, f"/agent/jobs/{job_id}", headers=as_user("alice"))
        assert reply.status_code == 404 and reply.json()["code"] == "not_found"


# --- another user's jobs and sessions ------------------------------------------------------------------------


def test_another_users_job_is_404_like_a_missing_one_and_stays_untouched(client: TestClient) -> None:
    job_id = ask(client, "alice").json()["job_id"]
    missing = client.get(f"/agent/jobs/{uuid.uuid4()}", headers=as_user("bob"))
    for method in ("GET", "DELETE"):
        reply = client.request(method, f"/agent/jobs/{job_id}", headers=as_user("bob"))
        assert (reply.status_code, reply.json()) == (404, missing.json())
    assert client.get(f"/agent/jobs/{job_id}", headers=as_user("alice")).json()["status"] == "queued"
    client.delete(f"/agent/jobs/{job_id}", headers=as_user("alice"))
    for method in ("GET", "DELETE"):  # the tombstone of a canceled job is still alice's only
        reply = client.request(method, f"/agent/jobs/{job_id}", headers=as_user("bob"))
        assert (reply.status_code, reply.json()) == (404, missing.json())


def test_asking_in_another_users_session_is_404_and_writes_nothing(client: TestClient, rconn: redis.Redis) -> None:
    session_id = client.post("/agent/sessions/new", headers=as_user("alice")).json()["session_id"]
    before = all_keys(rconn)
    reply = ask(client, "bob", session_id)
    assert reply.status_code == 404
    assert reply.json() == {"detail": "no such session", "code": "not_found"}
    assert all_keys(rconn) == before
    assert ask(client, "alice", session_id).status_code == 202


def test_new_session_is_owned_by_its_creator(client: TestClient, rconn: redis.Redis, settings: Settings) -> None:
    reply = client.post("/agent/sessions/new", headers=as_user("alice"))
    assert reply.status_code == 200
    session_id = reply.json()["session_id"]
    assert str(uuid.UUID(session_id)) == session_id
    assert rconn.get(K.session_owner(session_id)) == b"alice"
    assert 0 < rconn.pttl(K.session_owner(session_id)) <= settings.session_owner_ttl_s * 1000


# --- failures around Redis -------------------------------------------------------------------------------------


def test_enqueue_failing_after_admission_refunds_it_and_answers_503(
    client: TestClient, rconn: redis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_enqueue(*args: Any, **kwargs: Any) -> None:
        raise redis.ConnectionError("connection reset while enqueueing")

    monkeypatch.setattr(cast(FastAPI, client.app).state.ctx.queue, "enqueue", broken_enqueue)
    session_id = str(uuid.uuid4())
    reply = ask(client, "alice", session_id)
    assert reply.status_code == 503
    assert reply.json()["code"] == "redis_unavailable" and int(reply.headers["retry-after"]) > 0
    # the claim on the session stays; the rate entry, lease, session lock and queue deadline are gone
    assert all_keys(rconn) == {K.session_owner(session_id)}
    assert audit_lines(settings.audit_log) == []
    monkeypatch.undo()
    assert ask(client, "alice", session_id).status_code == 202  # concurrency 1: the slot was given back


def test_enqueue_failing_with_any_error_refunds_the_admission(
    client: TestClient, rconn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_enqueue(*args: Any, **kwargs: Any) -> None:
        raise ValueError("a bug in the enqueue path")

    monkeypatch.setattr(cast(FastAPI, client.app).state.ctx.queue, "enqueue", broken_enqueue)
    session_id = str(uuid.uuid4())
    with pytest.raises(ValueError):
        ask(client, "alice", session_id)
    assert all_keys(rconn) == {K.session_owner(session_id)}


def test_a_job_id_that_exists_is_never_enqueued_again_and_the_admission_is_refunded(
    client: TestClient, rconn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What RQ's unique=True guarantees: a second enqueue of one job id writes nothing (it would run twice)."""
    taken, alice_session, bob_session = uuid.uuid4(), str(uuid.uuid4()), str(uuid.uuid4())
    monkeypatch.setattr(uuid, "uuid4", lambda: taken)
    first = ask(client, "alice", alice_session, message="the first")
    assert first.status_code == 202 and first.json()["job_id"] == str(taken)
    before = {key: rconn.dump(key) for key in rconn.scan_iter(f"rq:job:{taken}*")}
    with pytest.raises(DuplicateJobError):
        ask(client, "bob", bob_session, message="the second")
    assert {key: rconn.dump(key) for key in rconn.scan_iter(f"rq:job:{taken}*")} == before
    assert rconn.lrange(QUEUE, 0, -1) == [str(taken).encode()]
    assert not rconn.exists(K.rate("bob"), K.leases("bob"), K.session_lock(bob_session))


def test_bodies_over_the_limit_are_413_before_being_read(client: TestClient, rconn: redis.Redis) -> None:
    huge = b'{"session_id": "' + str(uuid.uuid4()).encode() + b'", "message": "' + b"x" * 200_000 + b'"}'
    declared = client.post("/agent/ask", content=huge, headers=as_user("alice") | {"content-type": "application/json"})
    assert declared.status_code == 413 and declared.json()["code"] == "too_large"

    def chunks() -> Any:
        for start in range(0, len(huge), 16_384):
            yield huge[start : start + 16_384]

    headers = as_user("alice") | {"content-type": "application/json"}
    streamed = client.post("/agent/ask", content=chunks(), headers=headers)
    assert streamed.status_code == 413 and streamed.json()["code"] == "too_large"
    assert all_keys(rconn) == set()


class OwnRedis:
    """A private redis-server on a fixed free port that a test may stop and start again (no persistence)."""

    def __init__(self, procs: list[Proc], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.procs = procs
        self.log_path = log_path
        self.proc: Proc | None = None

    def start(self) -> None:
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no"]
        self.proc = Proc(args, {}, self.log_path)
        self.procs.append(self.proc)
        conn = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        wait_until(lambda: _pings(conn), 10, what="redis-server to answer")
        conn.close()

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.stop()


def _pings(conn: redis.Redis) -> bool:
    try:
        return bool(conn.ping())
    except redis.RedisError:
        return False


def test_redis_down_is_503_redis_unavailable_and_nothing_is_enqueued(
    make_settings: SettingsFactory, procs: list[Proc], tmp_path: Path
) -> None:
    server = OwnRedis(procs, tmp_path / "redis.log")
    server.start()
    api, base = start_api(make_settings(redis_url=server.url), tmp_path)
    procs.append(api)
    alice = as_user("alice")
    session_id = str(uuid.uuid4())

    server.stop()
    with httpx.Client(base_url=base, timeout=30) as http:
        asked = http.post("/agent/ask", json={"session_id": session_id, "message": "hi"}, headers=alice)
        assert asked.status_code == 503
        assert asked.json() == {"detail": asked.json()["detail"], "code": "redis_unavailable"}
        assert int(asked.headers["retry-after"]) > 0
        for method, path in [("GET", f"/agent/jobs/{uuid.uuid4()}"), ("GET", f"/agent/jobs/{uuid.uuid4()}?wait=2"),
                             ("POST", "/agent/sessions/new"), ("GET", f"/agent/sessions/{session_id}/history")]:
            reply = http.request(method, path, headers=alice)
            assert reply.status_code == 503 and reply.json()["code"] == "redis_unavailable", (path, reply.text)
        health = http.get("/agent/health").json()
        assert health["status"] == "degraded" and health["redis"] is False

        server.start()  # the same port again
        conn = redis.Redis.from_url(server.url)
        time.sleep(0.5)  # room for any retried write of the refused ask to land: there must be none
        assert conn.llen(QUEUE) == 0 and all_keys(conn) == set()
        # the API recovers on its own, and the only ask on record is the new one
        again = http.post("/agent/ask", json={"session_id": session_id, "message": "hi"}, headers=alice)
        assert again.status_code == 202
        job_id = again.json()["job_id"]
        assert lmembers(conn, QUEUE) == [job_id]
        assert zmembers(conn, K.rate("alice")) == {job_id}
        conn.close()


# --- limits over real processes -----------------------------------------------------------------------------


async def _ask_concurrently(bases: list[str], user: str, count: int) -> list[httpx.Response]:
    headers = as_user(user)
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=count)) as http:
        calls = [
            http.post(f"{bases[n % len(bases)]}/agent/ask", json={"session_id": str(uuid.uuid4()), "message": f"q{n}"},
                      headers=headers)
            for n in range(count)
        ]
        return list(await asyncio.gather(*calls))


def _assert_exactly_cap_admitted(replies: list[httpx.Response], cap: int, conn: redis.Redis) -> None:
    admitted = [r.json()["job_id"] for r in replies if r.status_code == 202]
    refused = [r for r in replies if r.status_code != 202]
    assert len(admitted) == cap
    assert {r.status_code for r in refused} == {429}
    assert {r.json()["code"] for r in refused} == {"concurrency_limited"}
    assert {r.json()["job_id"] for r in refused} <= set(admitted)
    assert sorted(lmembers(conn, QUEUE)) == sorted(admitted)
    assert zmembers(conn, K.leases("alice")) == set(admitted)


@pytest.mark.parametrize("cap", [1, 3])
def test_50_concurrent_asks_by_one_user_admit_exactly_the_concurrency_cap(
    make_settings: SettingsFactory, rconn: redis.Redis, procs: list[Proc], tmp_path: Path, cap: int
) -> None:
    api, base = start_api(make_settings(concurrency_per_user=cap), tmp_path)
    procs.append(api)
    replies = asyncio.run(_ask_concurrently([base], "alice", 50))
    _assert_exactly_cap_admitted(replies, cap, rconn)


def test_two_api_processes_share_one_concurrency_limit(
    make_settings: SettingsFactory, rconn: redis.Redis, procs: list[Proc], tmp_path: Path
) -> None:
    settings = make_settings(concurrency_per_user=3)
    bases = []
    for name in ("api1", "api2"):
        api, base = start_api(settings, tmp_path, name)
        procs.append(api)
        bases.append(base)
    replies = asyncio.run(_ask_concurrently(bases, "alice", 40))
    _assert_exactly_cap_admitted(replies, 3, rconn)
    # each process admitted or refused its half: both really took part
    assert {r.url.port for r in replies} == {httpx.URL(b).port for b in bases}


def test_61st_ask_in_window_gets_429_rate_limited_with_retry_after(
    make_settings: SettingsFactory, rconn: redis.Redis, procs: list[Proc], tmp_path: Path
) -> None:
    settings = make_settings(rate_max=60, rate_window_s=120, concurrency_per_user=100)
    api, base = start_api(settings, tmp_path)
    procs.append(api)
    replies = asyncio.run(_ask_concurrently([base], "alice", 60))
    assert [r.status_code for r in replies] == [202] * 60
    time.sleep(1.2)  # so that Retry-After must count from the oldest ask, not from now

    _, oldest = zfirst(rconn, K.rate("alice"))
    before = redis_ms(rconn)
    reply = httpx.post(f"{base}/agent/ask", json={"session_id": str(uuid.uuid4()), "message": "one more"},
                       headers=as_user("alice"), timeout=30)
    after = redis_ms(rconn)
    assert reply.status_code == 429
    assert reply.json() == {"detail": reply.json()["detail"], "code": "rate_limited"}
    window_ms = settings.rate_window_s * 1000
    retry_after = int(reply.headers["retry-after"])
    earliest, latest = (math.ceil((oldest + window_ms - now) / 1000) for now in (after, before))
    assert earliest <= retry_after <= latest
    assert retry_after < settings.rate_window_s
    assert f"retry in {retry_after} s" in reply.json()["detail"]
    assert rconn.zcard(K.rate("alice")) == 60
