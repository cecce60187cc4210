"""rq-dashboard at /agent/rq/: admins only, read-only by allow-list, JSON serializer, on real Redis."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from api.dashboard import MOUNT_PATH, READ_ENDPOINTS, build_flask_app
from api.main import create_app
from shared.settings import Settings
from tests.conftest import SettingsFactory
from tests.support import make_cookie

ADMIN = "alice"
# Written out here, not imported, so a route that changes class in api/dashboard.py or a new rq-dashboard
# route fails this file until someone decides which side it is on.
EXPECTED_READS = {
    "static", "rq_dashboard.static", "rq_dashboard.favicon",
    "rq_dashboard.queues_overview", "rq_dashboard.workers_overview", "rq_dashboard.jobs_overview",
    "rq_dashboard.job_view", "rq_dashboard.list_queues", "rq_dashboard.list_workers", "rq_dashboard.list_jobs",
    "rq_dashboard.job_info",
}
EXPECTED_WRITES = {
    "rq_dashboard.requeue_job_view", "rq_dashboard.requeue_all", "rq_dashboard.delete_job_view",
    "rq_dashboard.empty_queue", "rq_dashboard.compact_queue",
}
REGISTRIES = ["queued", "failed", "deferred", "started", "finished", "canceled", "scheduled"]
WRITE_METHODS = ["POST", "PUT", "PATCH", "DELETE"]


@pytest.fixture
def dash_settings(make_settings: SettingsFactory, rconn: redis.Redis) -> Settings:
    return make_settings(admin_users=f"{ADMIN},carol")


@pytest.fixture
def dash(dash_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(dash_settings)) as test_client:
        yield test_client


def enqueue_ask(settings: Settings, conn: redis.Redis, user: str = "bob", session_id: str = "s-1") -> Job:
    queue = Queue(settings.queue, connection=conn, serializer=JSONSerializer)
    return queue.enqueue("worker.jobs.run_ask", kwargs={"user": user, "session_id": session_id, "message": "hello"},
                         meta={"user": user, "session_id": session_id})


def sign_in(client: TestClient, user: str | None) -> None:
    client.cookies.clear()
    if user is not None:
        client.cookies.set("session", make_cookie(user))


def keyspace(conn: redis.Redis) -> dict[bytes | str, Any]:
    return {key: conn.dump(key) for key in conn.keys("*")}


def read_paths(settings: Settings, job_id: str) -> list[str]:
    q = settings.queue
    return [
        f"{MOUNT_PATH}/",
        f"{MOUNT_PATH}/0/view/queues",
        f"{MOUNT_PATH}/0/view/workers",
        f"{MOUNT_PATH}/0/view/jobs",
        f"{MOUNT_PATH}/0/view/jobs/{q}/queued/8/asc/1",
        f"{MOUNT_PATH}/0/view/job/{job_id}",
        f"{MOUNT_PATH}/0/data/queues.json",
        f"{MOUNT_PATH}/0/data/workers.json",
        f"{MOUNT_PATH}/0/data/jobs/{q}/queued/8/asc/1.json",
        f"{MOUNT_PATH}/0/data/job/{job_id}.json",
        f"{MOUNT_PATH}/static/css/main.css",
        f"{MOUNT_PATH}/favicon.ico",
    ]


def test_admin_sees_queues_workers_job_list_and_job_detail(dash: TestClient, dash_settings: Settings,
                                                           rconn: redis.Redis) -> None:
    job = enqueue_ask(dash_settings, rconn)
    sign_in(dash, ADMIN)
    before = keyspace(rconn)

    page = dash.get(f"{MOUNT_PATH}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert f'href="{MOUNT_PATH}/0/view/workers"' in page.text  # links carry the mount prefix
    assert f'{MOUNT_PATH}/static/js/jquery' in page.text
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    queues = dash.get(f"{MOUNT_PATH}/0/data/queues.json").json()["queues"]
    assert [(q["name"], q["count"]) for q in queues] == [(dash_settings.queue, 1)]

    workers = dash.get(f"{MOUNT_PATH}/0/view/workers")
    assert workers.status_code == 200 and "Workers" in workers.text
    assert dash.get(f"{MOUNT_PATH}/0/data/workers.json").json() == {"workers": []}

    listing = dash.get(f"{MOUNT_PATH}/0/data/jobs/{dash_settings.queue}/queued/8/asc/1.json")
    assert listing.status_code == 200
    assert [j["id"] for j in listing.json()["jobs"]] == [job.id]
    assert "worker.jobs.run_ask(" in listing.json()["jobs"][0]["description"]

    detail = dash.get(f"{MOUNT_PATH}/0/data/job/{job.id}.json")
    assert detail.status_code == 200
    body = detail.json()
    assert (body["id"], body["status"], body["origin"]) == (job.id, "queued", dash_settings.queue)
    assert '"user": "bob"' in body["metadata"] and '"session_id": "s-1"' in body["metadata"]
    page = dash.get(f"{MOUNT_PATH}/0/view/job/{job.id}")
    assert page.status_code == 200 and job.id in page.text

    for path in read_paths(dash_settings, job.id):
        assert dash.get(path).status_code == 200, path
        assert dash.head(path).status_code == 200, path
    assert dash.get(f"{MOUNT_PATH}/0/data/job/no-such-job.json").json()["code"] == "not_found"
    assert dash.get(f"{MOUNT_PATH}/1/data/queues.json").status_code == 404
    assert keyspace(rconn) == before  # reading wrote nothing


def test_signed_in_non_admin_gets_403(dash: TestClient, dash_settings: Settings, rconn: redis.Redis) -> None:
    job = enqueue_ask(dash_settings, rconn)
    sign_in(dash, "bob")
    for path in [*read_paths(dash_settings, job.id), f"{MOUNT_PATH}/requeue/{dash_settings.queue}"]:
        reply = dash.get(path)
        assert reply.status_code == 403, path
        assert reply.json() == {"detail": "the job dashboard is for administrators only", "code": "forbidden"}
    assert dash.post(f"{MOUNT_PATH}/queue/{dash_settings.queue}/compact").status_code == 403


def test_not_signed_in_gets_401(dash: TestClient, dash_settings: Settings, rconn: redis.Redis) -> None:
    job = enqueue_ask(dash_settings, rconn)
    for cookie in (None, make_cookie(ADMIN, secret="another-secret-0123456789")):
        dash.cookies.clear()
        if cookie:
            dash.cookies.set("session", cookie)
        for path in read_paths(dash_settings, job.id):
            reply = dash.get(path)
            assert reply.status_code == 401, path
            assert reply.json()["code"] == "not_authenticated"
        assert dash.post(f"{MOUNT_PATH}/job/{job.id}/delete").status_code == 401


def test_every_write_route_is_refused_for_an_admin_and_the_job_stays_queued(
        dash: TestClient, dash_settings: Settings, rconn: redis.Redis, request: pytest.FixtureRequest) -> None:
    job = enqueue_ask(dash_settings, rconn)
    assert READ_ENDPOINTS == EXPECTED_READS

    flask_app = build_flask_app(dash_settings)  # the same app the mount serves, to enumerate and test alone
    request.addfinalizer(flask_app.redis_conn.close)  # type: ignore[attr-defined]
    inner = flask_app.test_client()
    rules = list(flask_app.url_map.iter_rules())
    urls = flask_app.url_map.bind("testserver", script_name=MOUNT_PATH)
    endpoints = {rule.endpoint for rule in rules}
    assert endpoints - EXPECTED_READS == EXPECTED_WRITES, "an rq-dashboard route is neither read nor write here"

    values: dict[str, Any] = {"instance_number": 0, "job_id": job.id, "queue_name": dash_settings.queue,
                              "per_page": 8, "order": "asc", "page": 1, "filename": "css/main.css"}
    sign_in(dash, ADMIN)
    before = keyspace(rconn)
    tried: set[str] = set()
    for rule in rules:
        registries = REGISTRIES if "registry_name" in rule.arguments else [None]
        for registry in registries:
            args = {name: values[name] for name in rule.arguments if name != "registry_name"}
            if registry:
                args["registry_name"] = registry
            url = urls.build(rule.endpoint, args, force_external=False)
            is_write = rule.endpoint in EXPECTED_WRITES
            methods = ["GET", "HEAD", "OPTIONS", *WRITE_METHODS] if is_write else ["OPTIONS", *WRITE_METHODS]
            for method in methods:
                reply = dash.request(method, url)
                assert reply.status_code == 403, (method, url, reply.status_code)
                if method != "HEAD":
                    assert reply.json() == {"detail": "the job dashboard is read-only", "code": "forbidden"}
                # The Flask app refuses on its own too (the gate in front already stops every non-GET/HEAD).
                alone = inner.open(url.removeprefix(MOUNT_PATH), method=method)
                assert alone.status_code == 403, ("flask", method, url, alone.status_code)
            if is_write:
                tried.add(rule.endpoint)
    assert tried == EXPECTED_WRITES

    assert keyspace(rconn) == before
    fetched = Job.fetch(job.id, connection=rconn, serializer=JSONSerializer)
    assert fetched.get_status() == JobStatus.QUEUED
    assert Queue(dash_settings.queue, connection=rconn, serializer=JSONSerializer).job_ids == [job.id]


class _Touch:
    """A pickle that creates a file when loaded: proof that something unpickled job data."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def test_the_dashboard_never_unpickles_job_data(dash: TestClient, dash_settings: Settings, rconn: redis.Redis,
                                                tmp_path: Path) -> None:
    """rq-dashboard 0.9's job page fetches with RQ's pickle default even when told to use JSON."""
    job = enqueue_ask(dash_settings, rconn)
    marker = tmp_path / "unpickled"
    rconn.hset(job.key, "meta", pickle.dumps(_Touch(marker)))
    sign_in(dash, ADMIN)
    assert dash.get(f"{MOUNT_PATH}/0/view/job/{job.id}").status_code == 200
    assert dash.get(f"{MOUNT_PATH}/0/data/jobs/{dash_settings.queue}/queued/8/asc/1.json").status_code == 200
    unreadable = dash.get(f"{MOUNT_PATH}/0/data/job/{job.id}.json")
    assert unreadable.status_code == 500 and unreadable.json()["code"] == "internal_error"
    assert not marker.exists()
