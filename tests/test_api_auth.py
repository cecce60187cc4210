"""Who may call the API: signed cookies, issuer introspection, dev mode, and the cross-origin guard."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx2
import itsdangerous
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError

from api.main import create_app
from shared.keys import Keys, rq_queue_key
from shared.settings import Settings
from tests.support import SECRET, agent_keys, cookie_headers, free_port, make_cookie

SettingsFactory = Callable[..., Settings]
K = Keys("agent:")


def signed(payload: bytes, secret: str = SECRET) -> str:
    return itsdangerous.TimestampSigner(secret).sign(payload).decode()


def as_session(cookie: str) -> dict[str, str]:
    return cookie_headers({"session": cookie})


def assert_not_authenticated(reply: httpx2.Response) -> None:
    assert reply.status_code == 401, reply.text
    body = reply.json()
    assert set(body) == {"detail", "code"}
    assert body["code"] == "not_authenticated"
    assert isinstance(body["detail"], str) and body["detail"]
    assert reply.headers["www-authenticate"].startswith("Cookie")


# --- signed cookies -----------------------------------------------------------------------------------------


def test_valid_signed_cookie_signs_the_user_in(client: TestClient, alice: dict[str, str]) -> None:
    reply = client.get("/agent/me", headers=cookie_headers(alice))
    assert reply.status_code == 200
    assert reply.json() == {"user": "alice"}


BAD_COOKIES: dict[str, Callable[[Settings], str]] = {
    "expired": lambda s: make_cookie("alice", signed_at=time.time() - s.session_max_age_s - 60),
    "tampered": lambda s: base64.b64encode(json.dumps({"username": "admin"}).encode()).decode()
    + "." + make_cookie("alice").split(".", 1)[1],
    "wrong_secret": lambda s: make_cookie("alice", secret="another-secret-0123456789"),
    "no_username_key": lambda s: make_cookie(None, extra={"user": "alice"}),
    "username_not_a_string": lambda s: make_cookie(None, extra={"username": 42}),
    "username_with_control_character": lambda s: make_cookie("ali\nce"),
    "non_json_payload": lambda s: signed(base64.b64encode(b"not json at all")),
    "json_list_payload": lambda s: signed(base64.b64encode(b'["alice"]')),
    "not_base64_payload": lambda s: signed(b"%%%not-base64%%%"),
    "garbage": lambda s: "garbage",
}


@pytest.mark.parametrize("kind", sorted(BAD_COOKIES))
def test_bad_signed_cookie_is_401_not_authenticated(client: TestClient, settings: Settings, kind: str) -> None:
    assert_not_authenticated(client.get("/agent/me", headers=as_session(BAD_COOKIES[kind](settings))))


def test_missing_cookie_is_401_not_authenticated(client: TestClient) -> None:
    assert_not_authenticated(client.get("/agent/me"))


def test_cookie_signed_just_inside_max_age_is_accepted(client: TestClient, settings: Settings) -> None:
    cookie = make_cookie("alice", signed_at=time.time() - settings.session_max_age_s + 60)
    assert client.get("/agent/me", headers=as_session(cookie)).json() == {"user": "alice"}


def test_every_endpoint_except_health_needs_a_cookie(client: TestClient) -> None:
    job, session = uuid.uuid4(), uuid.uuid4()
    calls = [
        ("GET", "/agent/me", None),
        ("POST", "/agent/sessions/new", None),
        ("POST", "/agent/ask", {"session_id": str(session), "message": "hi"}),
        ("GET", f"/agent/jobs/{job}", None),
        ("DELETE", f"/agent/jobs/{job}", None),
        ("GET", f"/agent/sessions/{session}/history", None),
    ]
    for method, path, body in calls:
        assert_not_authenticated(client.request(method, path, json=body))
    assert client.get("/agent/health").status_code == 200


# --- introspection --------------------------------------------------------------------------------------------


@dataclass
class Issuer:
    """A real who-am-I server: answers by the `session` cookie it receives, records every request."""

    url: str
    users: dict[str, str] = field(default_factory=dict)  # cookie -> user name
    refresh: bool = False  # send Set-Cookie on success, as Starlette's SessionMiddleware does
    status: int | None = None  # force this status
    delay_s: float = 0.0
    seen_cookies: list[str] = field(default_factory=list)


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    state = Issuer(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.seen_cookies.append(self.headers.get("Cookie", ""))
            time.sleep(state.delay_s)
            cookie = self.headers.get("Cookie", "").removeprefix("session=")
            user = state.users.get(cookie)
            status = state.status or (200 if user else 401)
            body = json.dumps({"username": user} if status == 200 else {"detail": "no"}).encode()
            if status == 200 and state.status is not None:
                body = b"<html>not json</html>"
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if state.refresh and user:
                self.send_header("Set-Cookie", f"session={cookie}-refreshed; Path=/; HttpOnly")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/whoami"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def introspect_client(make_settings: SettingsFactory, rconn: redis.Redis, issuer: Issuer) -> Iterator[TestClient]:
    settings = make_settings(auth_mode="introspect", auth_url=issuer.url, auth_timeout_s=0.5)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_issuer_200_signs_the_user_in(introspect_client: TestClient, issuer: Issuer) -> None:
    issuer.users["tok-alice"] = "alice"
    reply = introspect_client.get("/agent/me", headers=as_session("tok-alice"))
    assert reply.status_code == 200 and reply.json() == {"user": "alice"}
    assert issuer.seen_cookies == ["session=tok-alice"]


def test_issuer_401_is_401_not_authenticated(introspect_client: TestClient, issuer: Issuer) -> None:
    assert_not_authenticated(introspect_client.get("/agent/me", headers=as_session("tok-unknown")))
    assert issuer.seen_cookies == ["session=tok-unknown"]


def test_no_cookie_is_401_without_asking_the_issuer(introspect_client: TestClient, issuer: Issuer) -> None:
    assert_not_authenticated(introspect_client.get("/agent/me"))
    assert issuer.seen_cookies == []


def test_issuer_answer_is_cached_in_redis_so_two_requests_hit_it_once(
    introspect_client: TestClient, issuer: Issuer, rconn: redis.Redis, settings: Settings
) -> None:
    issuer.users["tok-alice"] = "alice"
    for _ in range(2):
        assert introspect_client.get("/agent/me", headers=as_session("tok-alice")).json() == {"user": "alice"}
    assert len(issuer.seen_cookies) == 1
    cache_key = K.auth_cache(hashlib.sha256(b"tok-alice").hexdigest())
    assert rconn.get(cache_key) == b"alice"
    assert 0 < rconn.pttl(cache_key) <= settings.auth_cache_s * 1000


def test_issuer_refreshing_a_cookie_never_leaks_it_into_another_users_check(
    introspect_client: TestClient, issuer: Issuer
) -> None:
    issuer.users.update({"tok-alice": "alice", "tok-bob": "bob"})
    issuer.refresh = True
    assert introspect_client.get("/agent/me", headers=as_session("tok-alice")).json() == {"user": "alice"}
    assert introspect_client.get("/agent/me", headers=as_session("tok-bob")).json() == {"user": "bob"}
    assert issuer.seen_cookies == ["session=tok-alice", "session=tok-bob"]


def test_issuer_down_is_503_auth_unavailable_never_401(make_settings: SettingsFactory, rconn: redis.Redis) -> None:
    settings = make_settings(auth_mode="introspect", auth_url=f"http://127.0.0.1:{free_port()}/whoami")
    with TestClient(create_app(settings)) as test_client:
        reply = test_client.get("/agent/me", headers=as_session("tok-alice"))
    assert reply.status_code == 503
    assert reply.json() == {"detail": reply.json()["detail"], "code": "auth_unavailable"}
    assert int(reply.headers["retry-after"]) > 0


@pytest.mark.parametrize("failure", ["status_500", "not_json", "timeout"])
def test_issuer_failing_is_503_auth_unavailable(introspect_client: TestClient, issuer: Issuer, failure: str) -> None:
    issuer.users["tok-alice"] = "alice"
    if failure == "status_500":
        issuer.status = 500
    elif failure == "not_json":
        issuer.status = 200
    else:
        issuer.delay_s = 1.0
    reply = introspect_client.get("/agent/me", headers=as_session("tok-alice"))
    assert reply.status_code == 503, reply.text
    assert reply.json()["code"] == "auth_unavailable"
    assert "retry-after" in reply.headers


# --- settings that must not start ---------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.com"])
def test_dev_mode_refuses_a_host_other_than_loopback(make_settings: SettingsFactory, host: str) -> None:
    with pytest.raises(ValidationError, match="only binds loopback"):
        make_settings(auth_mode="dev", host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_dev_mode_starts_on_loopback_and_lets_a_dev_user_in(
    make_settings: SettingsFactory, rconn: redis.Redis, host: str
) -> None:
    settings = make_settings(auth_mode="dev", host=host)
    with TestClient(create_app(settings)) as test_client:
        assert test_client.get("/agent/me").json() == {"user": "dev"}
        assert test_client.get("/agent/me", headers=cookie_headers({"dev_user": "carol"})).json() == {"user": "carol"}


@pytest.mark.parametrize("secret", ["", "changeme", "CHANGEME", "  secret  ", "placeholder", "short-secret"])
def test_placeholder_empty_or_short_secret_refuses_to_start(make_settings: SettingsFactory, secret: str) -> None:
    with pytest.raises(ValidationError, match="AGENT_SESSION_SECRET"):
        make_settings(session_secret=secret)


def test_introspect_mode_without_issuer_url_refuses_to_start(make_settings: SettingsFactory) -> None:
    with pytest.raises(ValidationError, match="AGENT_AUTH_URL"):
        make_settings(auth_mode="introspect", auth_url="")


def _run_api_command(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    command = Path(sys.executable).parent / "overlord-agent"
    base = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    return subprocess.run([str(command), "api"], env=base | env, cwd=cwd, capture_output=True, text=True,
                          timeout=30, check=False)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AGENT_SESSION_SECRET": "changeme"}, "AGENT_SESSION_SECRET is empty, a placeholder"),
        ({}, "AGENT_SESSION_SECRET is empty, a placeholder"),
        ({"AGENT_AUTH_MODE": "dev", "AGENT_HOST": "0.0.0.0"}, "only binds loopback, not '0.0.0.0'"),
    ],
    ids=["placeholder_secret", "no_secret", "dev_on_all_interfaces"],
)
def test_api_command_exits_nonzero_with_a_clear_message_on_unsafe_settings(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    port = free_port()
    done = _run_api_command(env | {"AGENT_PORT": str(port)}, tmp_path)
    assert done.returncode == 2
    assert "overlord-agent: invalid settings:" in done.stderr and message in done.stderr
    assert "Traceback" not in done.stderr


# --- cross-origin guard ---------------------------------------------------------------------------------------


@pytest.fixture
def origin_client(make_settings: SettingsFactory, rconn: redis.Redis) -> Iterator[TestClient]:
    settings = make_settings(allowed_origins="https://tracker.example/, https://other.example")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://testserver.evil.example"},
        {"Origin": "https://testserver"},
        {"Origin": "http://testserver:8080"},
        {"Sec-Fetch-Site": "cross-site"},
    ],
    ids=["foreign", "null", "suffix_trick", "other_scheme", "other_port", "sec_fetch_cross_site"],
)
def test_state_change_from_a_foreign_origin_is_403_and_changes_nothing(
    origin_client: TestClient, rconn: redis.Redis, alice: dict[str, str], headers: dict[str, str]
) -> None:
    queued = origin_client.post("/agent/ask", json={"session_id": str(uuid.uuid4()), "message": "first"},
                                headers=cookie_headers(alice))
    assert queued.status_code == 202
    job_id = queued.json()["job_id"]
    keys_before = agent_keys(rconn)
    session = str(uuid.uuid4())
    requests = [
        ("POST", "/agent/sessions/new", None),
        ("POST", "/agent/ask", {"session_id": session, "message": "hi"}),
        ("DELETE", f"/agent/jobs/{job_id}", None),
    ]
    for method, path, body in requests:
        reply = origin_client.request(method, path, json=body, headers=cookie_headers(alice, **headers))
        assert reply.status_code == 403, (method, path, reply.text)
        assert reply.json()["code"] == "cross_origin" and isinstance(reply.json()["detail"], str)
    assert agent_keys(rconn) == keys_before
    assert rconn.lrange(rq_queue_key("agent"), 0, -1) == [job_id.encode()]
    assert origin_client.get(f"/agent/jobs/{job_id}", headers=cookie_headers(alice)).json()["status"] == "queued"


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://tracker.example"},
        {"Origin": "https://other.example/"},
        {"Origin": "http://testserver"},
        {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "same-site"},
        {},
    ],
    ids=["allowed", "allowed_trailing_slash", "same_origin", "same_origin_fetch_metadata", "same_site", "no_origin"],
)
def test_state_change_from_an_allowed_or_the_same_origin_passes(
    origin_client: TestClient, alice: dict[str, str], headers: dict[str, str]
) -> None:
    created = origin_client.post("/agent/sessions/new", headers=cookie_headers(alice, **headers))
    assert created.status_code == 200
    session = created.json()["session_id"]
    asked = origin_client.post("/agent/ask", json={"session_id": session, "message": "hi"},
                               headers=cookie_headers(alice, **headers))
    assert asked.status_code == 202
    canceled = origin_client.delete(f"/agent/jobs/{asked.json()['job_id']}", headers=cookie_headers(alice, **headers))
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
