"""The RQ worker: JSON only, an allow-list of job functions, fast failure detection, the expiry sweep."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from shared.settings import Settings
from worker.jobs import on_horse_killed
from worker.sweeper import sweep_expired

log = logging.getLogger("agent.worker")

ALLOWED_FUNCTIONS = frozenset({"worker.jobs.run_ask"})
ALLOWED_CALLBACKS = frozenset({"worker.jobs.on_failure", "worker.jobs.on_stopped"})


class RefusedJob(Exception):
    """A job names a function that is not on the allow-list; it is never imported."""


class AgentJob(Job):
    """Refuses to import anything but the project's own job functions and callbacks."""

    @property
    def func(self) -> Any:
        if self.func_name not in ALLOWED_FUNCTIONS:
            raise RefusedJob(f"job function {self.func_name!r} is not allowed")
        return super().func

    @property
    def failure_callback(self) -> Any:
        self._check_callback(self._failure_callback_name)
        return super().failure_callback

    @property
    def success_callback(self) -> Any:
        self._check_callback(self._success_callback_name)
        return super().success_callback

    @property
    def stopped_callback(self) -> Any:
        self._check_callback(self._stopped_callback_name)
        return super().stopped_callback

    @staticmethod
    def _check_callback(name: str | None) -> None:
        if name and name not in ALLOWED_CALLBACKS:
            raise RefusedJob(f"callback {name!r} is not allowed")


class AgentWorker(Worker):
    """RQ's forking worker plus the sweep that expires asks left queued too long."""

    def __init__(self, *args: Any, settings: Settings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.agent_settings = settings
        self.stop_asked = False

    def request_stop(self, signum: Any, frame: Any) -> None:
        self.stop_asked = True  # RQ raises StopRequested when idle without recording that a stop was asked
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()  # type: ignore[no-untyped-call]
        try:
            sweep_expired(self.connection, self.agent_settings)
        except redis.RedisError as exc:
            log.warning("expiry sweep failed: %s", exc)


def worker_connection(settings: Settings) -> redis.Redis:
    """Commands retry for about 20 s, so a Redis restart does not end the worker or fail its job."""
    retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=20)
    return redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=5, health_check_interval=10, retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError],
    )


def build_worker(settings: Settings, name: str | None = None) -> AgentWorker:
    conn = worker_connection(settings)
    queue = Queue(settings.queue, connection=conn, serializer=JSONSerializer, job_class=AgentJob)
    return AgentWorker(
        [queue],
        name=name,
        connection=conn,
        serializer=JSONSerializer,
        job_class=AgentJob,
        worker_ttl=settings.worker_ttl_s,
        maintenance_interval=settings.maintenance_interval_s,
        job_monitoring_interval=settings.job_monitoring_interval_s,
        default_result_ttl=settings.result_ttl_s,
        work_horse_killed_handler=on_horse_killed,
        settings=settings,
    )


def _stop_before_start(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def run_worker(settings: Settings, name: str | None = None, burst: bool = False) -> int:
    """Work until stopped (SIGTERM: finish the job in flight, then exit). RQ quits its loop on any Redis
    error; then this waits for Redis and starts a fresh worker under the same name, so systemd need not."""
    delay_s = 0.5
    while True:
        # RQ installs its own handlers only after it has registered: a stop signal before then exits at once.
        signal.signal(signal.SIGTERM, _stop_before_start)
        signal.signal(signal.SIGINT, _stop_before_start)
        worker = build_worker(settings, name)
        log.info("worker %s on queue %s (job timeout %s s)", worker.name, settings.queue, settings.job_timeout_s)
        try:
            worker.work(burst=burst, with_scheduler=False, logging_level="INFO")
        except redis.RedisError as exc:
            log.warning("worker %s: redis error %s", worker.name, exc)
        except SystemExit:
            with contextlib.suppress(Exception):
                worker.register_death()  # type: ignore[no-untyped-call]  # a stop may come after registering
            raise
        if burst or worker.stop_asked:
            return 0
        log.warning("worker %s left its loop; restarting in %.1f s", worker.name, delay_s)
        time.sleep(delay_s)
        delay_s = min(delay_s * 2, 10.0)
