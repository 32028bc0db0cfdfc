"""Redis crashes and comes back (append-only file, as in the compose file): nothing accepted is lost,
the API answers 503 at once meanwhile, and the workers reconnect by themselves."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for_status
from tests.reliability.conftest import LONG, SMALL, DurableRedis, wait_progress


@pytest.fixture(scope="module")
def durable_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DurableRedis]:
    server = DurableRedis(tmp_path_factory.mktemp("redis-aof"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_url(durable_redis: DurableRedis) -> str:
    """Overrides the shared server: this module's API and worker talk to the one that crashes."""
    return durable_redis.url


def test_jobs_accepted_before_a_redis_crash_run_after_it(
    http: Any, start_worker: Any, durable_redis: DurableRedis
) -> None:
    start_worker("through-outage", "--queues", "generate")
    running = http.post("/generate", json={**LONG, "num_images": 1}).json()["id"]
    wait_progress(http, running)
    queued = [http.post("/generate", json={**SMALL, "seed": i}).json()["id"] for i in range(3)]
    assert http.get(f"/jobs/{queued[-1]}").json()["status"] == "queued"

    durable_redis.crash()
    try:
        for method, path, body in [("POST", "/generate", SMALL), ("GET", f"/jobs/{queued[0]}", None),
                                   ("GET", "/adapters", None), ("DELETE", f"/jobs/{queued[1]}", None)]:
            started = time.monotonic()
            response = http.request(method, path, json=body)
            assert response.status_code == 503, (path, response.text)
            assert "unavailable" in response.json()["detail"]
            assert response.headers["Retry-After"]
            assert time.monotonic() - started < 5, path  # an answer, not a hang
        assert http.get("/health").status_code == 200
        time.sleep(2)  # the worker notices the outage and retries meanwhile
    finally:
        durable_redis.start()

    for job_id in queued:
        job = wait_for_status(http, job_id, timeout_s=90)
        assert job["status"] == "finished", job["error"]
        assert http.get(job["links"]["images"][0]).status_code == 200
    # The job that was running when Redis died ends, one way or the other, with a reason: never "started".
    job = wait_for_status(http, running, timeout_s=90)
    assert job["status"] == "finished" or "stopped responding" in job["error"], job

    after = wait_for_status(http, http.post("/generate", json=SMALL).json()["id"], timeout_s=60)
    assert after["status"] == "finished", after["error"]
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["live_workers"] == 1


def test_sse_clients_get_an_error_event_not_a_hang_when_redis_dies(
    http: Any, api_server: Any, durable_redis: DurableRedis
) -> None:
    job_id = http.post("/generate", json=LONG).json()["id"]
    wait_progress(http, job_id, step=1)
    with httpx.Client(base_url=api_server.url, headers=http.headers, timeout=20) as client:
        with client.stream("GET", f"/jobs/{job_id}/events") as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("id: ")
            durable_redis.crash()
            try:
                started = time.monotonic()
                rest = list(lines)
                assert time.monotonic() - started < 15
            finally:
                durable_redis.start()
    assert [line for line in rest if line][-2:] == ["event: error", 'data: {"detail": "event store unavailable"}'], rest[-4:]
    job = wait_for_status(http, job_id, timeout_s=90)
    assert job["status"] == "finished" or "stopped responding" in job["error"], job
    # After the restart the same API streams again (its async Redis client reconnected).
    replay = http.get(f"/jobs/{job_id}/events").text
    assert '"status": "queued"' in replay and f'"status": "{job["status"]}"' in replay
