"""One error hierarchy for the whole service; the API maps it to HTTP in one handler (api/errors.py)."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error a user can be shown: an HTTP status, a stable code and a human sentence."""

    status_code = 500
    code = "internal_error"

    def __init__(self, detail: str, *, retry_after_s: int | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail, "code": self.code, **self.extra}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


class NotAuthenticated(ServiceError):
    """No session cookie, or one that is expired, tampered with or unknown to the issuer."""

    status_code = 401
    code = "not_authenticated"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Cookie realm="dereth-tracker"'}


class CrossOriginRefused(ServiceError):
    """A state-changing request from an Origin that is not on the allow-list."""

    status_code = 403
    code = "cross_origin"


class Forbidden(ServiceError):
    """Signed in, but not allowed here (the admin dashboard)."""

    status_code = 403
    code = "forbidden"


class NotFound(ServiceError):
    """A job or session that does not exist or is not the caller's (the same answer for both)."""

    status_code = 404
    code = "not_found"


class SessionBusy(ServiceError):
    """The session already has a turn queued or running."""

    status_code = 409
    code = "session_busy"


class InvalidInput(ServiceError):
    """The request is malformed."""

    status_code = 422
    code = "invalid_request"


class RateLimited(ServiceError):
    """The user's rolling window of asks is full."""

    status_code = 429
    code = "rate_limited"


class ConcurrencyLimited(ServiceError):
    """The user already has as many asks queued or running as allowed."""

    status_code = 429
    code = "concurrency_limited"


class Unavailable(ServiceError):
    """A dependency is down or the service is full: try again later."""

    status_code = 503
    code = "unavailable"


class RedisUnavailable(Unavailable):
    """Redis does not answer: nothing is admitted (fail closed)."""

    code = "redis_unavailable"


class QueueFull(Unavailable):
    """The global cap on queued jobs is reached."""

    code = "queue_full"


class AuthUnavailable(Unavailable):
    """The session issuer's who-am-I endpoint does not answer."""

    code = "auth_unavailable"


class Draining(Unavailable):
    """Ops are draining the service for a deploy."""

    code = "draining"


class JobFailed(Exception):
    """Raised by the ask job so RQ records a failure; `code` and `message` are what the user is shown."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
