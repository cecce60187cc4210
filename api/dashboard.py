"""rq-dashboard for admins at /agent/rq/: the API's own sign-in, read-only, JSON only.

rq-dashboard 0.9 is not read-only even with `--disable-delete` (requeue answers a plain GET, compact works),
and some of its views fetch jobs with RQ's default pickle serializer whatever it is configured with. So:

- the gate in front (ASGI) lets only AGENT_ADMIN_USERS in, and only GET/HEAD through;
- the Flask app refuses every route whose endpoint is not in READ_ENDPOINTS (an allow-list matched by Flask's
  own router) before any view runs or any Redis command is sent;
- the names rq_dashboard.web uses for Job, Queue and Worker are bound to JSON-only classes that never write
  (RQ's own versions drop dangling ids from queues and dead workers from the registry on read).

Flask, rq-dashboard (and six, which it imports undeclared) and a2wsgi are the optional `dashboard` extra: without
them the mount answers admins 503. The Flask app is built in the lifespan and its threads stopped at shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI
from redis import Redis, RedisError
from rq import Queue, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.context import AppContext
from api.errors import service_error_response
from shared.errors import Forbidden, ServiceError, Unavailable
from shared.settings import Settings

if TYPE_CHECKING:
    from a2wsgi import WSGIMiddleware
    from flask import Flask

log = logging.getLogger("agent.dashboard")

MOUNT_PATH = "/agent/rq"
READ_METHODS = frozenset({"GET", "HEAD"})
# Every rq-dashboard 0.9 endpoint that only reads. Anything else (requeue, requeue_all, delete, empty, compact,
# and whatever a later version adds) is refused.
READ_ENDPOINTS = frozenset({
    "static",
    "rq_dashboard.static",
    "rq_dashboard.favicon",
    "rq_dashboard.queues_overview",
    "rq_dashboard.workers_overview",
    "rq_dashboard.jobs_overview",
    "rq_dashboard.job_view",
    "rq_dashboard.list_queues",
    "rq_dashboard.list_workers",
    "rq_dashboard.list_jobs",
    "rq_dashboard.job_info",
})
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class JsonJob(Job):
    """A Job that (de)serializes with JSON only, whatever serializer its caller passes."""

    def __init__(self, id: str | None = None, connection: Redis | None = None, serializer: object = None) -> None:
        super().__init__(id, connection=connection, serializer=JSONSerializer)


class ReadOnlyQueue(Queue):
    """A Queue of JsonJobs whose fetch_job does not remove the id of a job that is gone."""

    job_class = JsonJob

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(job_class=JsonJob, serializer=JSONSerializer)
        super().__init__(*args, **kwargs)

    def fetch_job(self, job_id: str) -> Job | None:
        try:
            job = JsonJob.fetch(job_id, connection=self.connection)
        except NoSuchJobError:
            return None
        return job if job.origin == self.name else None


class ReadOnlyWorker(Worker):
    """A Worker as seen from outside: JsonJobs, ReadOnlyQueues, and no SREM of a worker that is gone."""

    job_class = JsonJob
    queue_class = ReadOnlyQueue

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(job_class=JsonJob, queue_class=ReadOnlyQueue, serializer=JSONSerializer)
        super().__init__(*args, **kwargs)

    @classmethod
    def find_by_key(cls, worker_key: str, connection: Redis, job_class: Any = None, queue_class: Any = None,
                    serializer: Any = None) -> Worker | None:
        if not connection.exists(worker_key):
            return None
        found = super().find_by_key(worker_key, connection, JsonJob, ReadOnlyQueue, JSONSerializer)
        return found if isinstance(found, Worker) else None


def _json_error(status: int, code: str, detail: str) -> Any:
    from flask import jsonify

    response = jsonify(detail=detail, code=code)
    response.status_code = status
    return response


def build_flask_app(settings: Settings) -> Flask:
    """The rq-dashboard Flask app: read-only, JSON serializer, one Redis client with timeouts (closed by the caller)."""
    import rq_dashboard.web as web
    from flask import Flask, current_app, request
    from werkzeug.exceptions import HTTPException, MethodNotAllowed
    from werkzeug.routing import RequestRedirect

    # rq_dashboard.web keeps these as module globals: bind them for every app this process builds.
    web.config.serializer = JSONSerializer
    web.Job = JsonJob
    web.Queue = ReadOnlyQueue
    web.Worker = ReadOnlyWorker
    # Its before_request opens a new client per request; hand it the app's own instead.
    web.from_url = lambda _url, **_options: (None, current_app.redis_conn)  # type: ignore[attr-defined]

    # Rooted at rq_dashboard's package so its templates' url_for('static') serves rq_dashboard/static.
    app = Flask(web.__name__.rpartition(".")[0])
    app.config.update(
        RQ_DASHBOARD_REDIS_URL=(settings.dashboard_redis_url or settings.redis_url,),
        RQ_DASHBOARD_DISABLE_DELETE=True,  # hides the delete buttons; the allow-list is what refuses
    )
    app.redis_conn = Redis.from_url(  # type: ignore[attr-defined]
        settings.dashboard_redis_url or settings.redis_url, socket_timeout=5, socket_connect_timeout=2
    )

    @app.before_request
    def _read_only() -> Any:
        """Runs before the blueprint's own hooks and any view: only allow-listed reads get further."""
        if request.method not in READ_METHODS:
            return _json_error(403, "forbidden", "the job dashboard is read-only")
        rule = request.url_rule
        if rule is None:
            if isinstance(request.routing_exception, RequestRedirect):
                return None  # Flask answers with the redirect; no view runs
            if isinstance(request.routing_exception, MethodNotAllowed):
                return _json_error(403, "forbidden", "the job dashboard is read-only")  # a write-only route
            return _json_error(404, "not_found", "no such dashboard page")
        if rule.endpoint not in READ_ENDPOINTS:
            log.warning("dashboard: refused %s %s (%s)", request.method, request.path, rule.endpoint)
            return _json_error(403, "forbidden", "the job dashboard is read-only")
        if (request.view_args or {}).get("instance_number", 0) != 0:
            return _json_error(404, "not_found", "no such Redis instance")
        return None

    @app.errorhandler(NoSuchJobError)
    def _no_such_job(_: NoSuchJobError) -> Any:
        return _json_error(404, "not_found", "no such job (it may have expired)")

    @app.errorhandler(RedisError)
    def _redis_down(exc: RedisError) -> Any:
        log.warning("dashboard: redis unavailable: %s", exc)
        response = _json_error(503, "redis_unavailable", "the job store is unavailable; try again shortly")
        response.headers["Retry-After"] = "5"
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        if isinstance(exc, HTTPException):
            return exc
        log.exception("dashboard: unexpected error on %s", request.path)
        return _json_error(500, "internal_error", "internal error; it has been logged")

    @app.after_request
    def _headers(response: Any) -> Any:
        response.headers.update(SECURITY_HEADERS)
        return response

    app.register_blueprint(web.blueprint, url_prefix="")
    return app


class DashboardGate:
    """The ASGI app mounted at MOUNT_PATH: the API's sign-in, admins only, reads only, then the Flask app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.admins = frozenset(settings.admin_users)
        self.flask_app: Flask | None = None
        self.wsgi: WSGIMiddleware | None = None

    def open(self) -> None:
        try:
            from a2wsgi import WSGIMiddleware

            self.flask_app = build_flask_app(self.settings)
        except ImportError as exc:
            log.warning("rq-dashboard is not available at %s/ (%s): install overlord-agent[dashboard]",
                        MOUNT_PATH, exc)
            return
        self.wsgi = WSGIMiddleware(self.flask_app, workers=4)  # type: ignore[arg-type]

    def close(self) -> None:
        if self.wsgi is not None:
            self.wsgi.executor.shutdown(wait=True, cancel_futures=True)
            self.wsgi = None
        if self.flask_app is not None:
            self.flask_app.redis_conn.close()  # type: ignore[attr-defined]
            self.flask_app = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        request = Request(scope, receive)
        try:
            ctx: AppContext = request.app.state.ctx
            user = await ctx.auth.user(request)
            if user not in self.admins:
                raise Forbidden("the job dashboard is for administrators only")
            if request.method not in READ_METHODS:
                log.warning("dashboard: refused %s %s for %s", request.method, request.url.path, user)
                raise Forbidden("the job dashboard is read-only")
            if self.wsgi is None:
                raise Unavailable("the job dashboard is not installed on this server")
        except ServiceError as exc:
            await service_error_response(exc)(scope, receive, send)
            return
        app: ASGIApp = self.wsgi  # type: ignore[assignment]
        await app(scope, receive, send)


def router(settings: Settings) -> APIRouter:
    """The dashboard mount, with a lifespan (merged into the app's) that builds and stops the Flask app."""
    gate = DashboardGate(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        gate.open()
        try:
            yield
        finally:
            gate.close()

    dashboard = APIRouter(lifespan=lifespan)
    dashboard.mount(MOUNT_PATH, gate, name="rq_dashboard")
    return dashboard
