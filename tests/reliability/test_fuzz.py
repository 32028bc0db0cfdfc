"""Fuzz every operation of the OpenAPI schema against the real API (uvicorn + Redis): no 5xx, no hang.

Bounded: a fixed number of examples per operation, derandomized so a failure reproduces, and a
client timeout so a request that hangs fails the test instead of stalling it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import auth

EXAMPLES_PER_OPERATION = 25
REQUEST_TIMEOUT_S = 10
# 503 here is the documented answer of a service with no live worker (this test starts none).
EXPECTED_5XX = {("GET", "/ready", 503)}


@pytest.fixture(scope="module")
def service_env(service_env: dict[str, str]) -> dict[str, str]:
    # An adapter upload answers at once (202) instead of waiting for a worker that is not there.
    return {**service_env, "URAE_ADAPTER_IMPORT_WAIT_S": "0", "URAE_MAX_QUEUE_DEPTH": "20"}


@pytest.fixture(scope="module")
def api_schema(api_server: Any) -> Any:
    return schemathesis.openapi.from_url(f"{api_server.url}/openapi.json")


def test_no_request_gets_a_server_error_or_hangs(api_schema: Any) -> None:
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case: Any) -> None:
            response = case.call(headers=auth(), timeout=REQUEST_TIMEOUT_S)
            statuses[response.status_code] += 1
            if response.status_code >= 500 and (case.method.upper(), case.path, response.status_code) not in EXPECTED_5XX:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}")

        call()
    assert failures == []
    assert sum(statuses.values()) >= 5 * len(operations), statuses
    print(sorted(statuses.items()))
