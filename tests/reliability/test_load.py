"""A small, bounded run of bench/load_test.py against the real API while a worker is busy."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import pytest

from tests.conftest import API_KEY, REPO_ROOT

MAX_QUEUE_DEPTH = 8


def load_test_module() -> Any:
    spec = importlib.util.spec_from_file_location("load_test", REPO_ROOT / "bench" / "load_test.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def service_env(service_env: dict[str, str]) -> dict[str, str]:
    # A short queue, so that the load fills it and admission has to answer 429.
    return {**service_env, "URAE_MAX_QUEUE_DEPTH": str(MAX_QUEUE_DEPTH), "URAE_RESULT_TTL_S": "600"}


def test_under_load_only_429s_and_every_job_record_expires(api_server: Any, start_worker: Any,
                                                          service_env: dict[str, str]) -> None:
    start_worker("gen-load", "--queues", "generate", env={"URAE_TORCH_THREADS": "1"})
    load_test = load_test_module()
    report = load_test.run_load(api_server.url, API_KEY, service_env["URAE_REDIS_URL"], duration_s=6,
                                submitters=4, pollers=3, streamers=2, drain_timeout_s=90)
    summary = report.summary()
    print(summary)
    assert report.unexpected_errors == {}, summary
    assert report.errors.get("submit 429", 0) > 0, summary  # the queue did fill up: admission was exercised
    assert len(report.accepted) >= MAX_QUEUE_DEPTH
    assert dict(report.outcomes) == {"finished": len(report.accepted)}, summary
    assert len(report.latencies["poll"]) > 0 and len(report.latencies["stream"]) > 0
    assert report.job_keys >= len(report.accepted) and report.job_keys_without_ttl == 0
    # Bounded memory: what the accepted jobs left behind, a few KiB each, not megabytes.
    grown = report.redis_memory_after - report.redis_memory_before
    assert grown < 20_000 * len(report.accepted) + 1_000_000, summary
