"""Property-based run of every operation in the app's own OpenAPI schema (schemathesis), signed in.

Each generated request, valid or not, must not be answered with a server error, and each answer must match
the schema the app declares for its status code.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance
from schemathesis.specs.openapi.schemas import OpenApiSchema

from api.main import create_app
from shared.settings import Settings
from tests.support import cookie_headers, make_cookie

OPERATIONS = [
    "GET /agent/health",
    "GET /agent/me",
    "POST /agent/sessions/new",
    "GET /agent/sessions/{session_id}/history",
    "POST /agent/ask",
    "GET /agent/jobs/{job_id}",
    "DELETE /agent/jobs/{job_id}",
]
MAX_EXAMPLES = 50
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


@pytest.fixture
def api_schema(settings: Settings, rconn: redis.Redis) -> Iterator[OpenApiSchema]:
    app = create_app(settings)
    yield schemathesis.openapi.from_asgi("/agent/openapi.json", app)
    asgi.shutdown_lifespans()  # close the app's Redis and HTTP clients before the next test


def test_fuzzed_operations_are_every_operation_in_the_schema(api_schema: OpenApiSchema) -> None:
    labels = []
    for result in api_schema.get_all_operations():
        assert isinstance(result, Ok), result
        labels.append(result.ok().label)
    assert sorted(labels) == sorted(OPERATIONS)


# Invalid requests exist only where an operation takes input with a shape (a UUID, a bounded number, a body).
CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [
    (label, GenerationMode.NEGATIVE)
    for label in ("GET /agent/sessions/{session_id}/history", "POST /agent/ask", "GET /agent/jobs/{job_id}")
]


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_operation_answers_within_its_declared_schema_and_never_5xx(
    api_schema: OpenApiSchema, label: str, mode: GenerationMode
) -> None:
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]
    cookie = cookie_headers({"session": make_cookie("fuzzer")})

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(headers=cookie, checks=CHECKS)

    run()
