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


def test_webhook_retries_go_on_after_a_redis_restart(
    service_env: dict[str, str], durable_redis: DurableRedis, tmp_path: Any
) -> None:
    """A retry waiting when Redis dies is sent once Redis is back (within seconds, not at a
    maintenance cycle), by the same webhook worker process."""
    import base64
    import os
    import subprocess
    import sys

    import redis

    from jobstore.webhook_deliveries import delivery_key, enqueue_delivery
    from tests.conftest import REPO_ROOT
    from tests.webhooks.test_webhooks import Receiver

    receiver = Receiver()
    with receiver.lock:
        receiver.scripts["/after-restart"] = [(500, 0.0)]
    env = {**os.environ, **service_env, "PYTHONUNBUFFERED": "1",
           "URAE_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"urae-serve test webhook secret!!").decode(),
           "URAE_WEBHOOK_ALLOW_HOSTS": "127.0.0.0/8", "URAE_WEBHOOK_BACKOFF_S": "5"}
    log = open(tmp_path / "webhooks.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "webhooks"], cwd=REPO_ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        conn = redis.Redis.from_url(durable_redis.url)
        message_id = enqueue_delivery(conn, "2" * 32, "generate", "restart-owner",
                                      {"url": receiver.url("/after-restart")}, "completed", {"status": "finished"},
                                      ttl_s=600)
        receiver.wait("/after-restart", 1, timeout_s=30)  # answered 500: retried in 5 s
        time.sleep(1.5)  # the retry is in the append-only file (fsync every second)
        durable_redis.crash()
        time.sleep(1.0)
        durable_redis.start()
        restarted = time.monotonic()
        requests = receiver.wait("/after-restart", 2, timeout_s=60)
        took = time.monotonic() - restarted
        print(f"the retry was sent {took:.1f} s after Redis came back")
        assert took < 15
        assert {r["headers"]["webhook-id"] for r in requests} == {message_id}
        deadline = time.monotonic() + 10
        while conn.exists(delivery_key(message_id)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not conn.exists(delivery_key(message_id))
        assert worker.poll() is None  # the same process, never restarted
        conn.close()
    finally:
        worker.terminate()
        worker.wait(timeout=15)
        log.close()
        receiver.server.shutdown()
