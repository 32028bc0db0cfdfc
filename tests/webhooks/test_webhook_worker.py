"""The webhook worker process itself: SIGTERM with an attempt in flight ends it within seconds and the
delivery is sent by the next worker, nothing lost. Deliveries are queued straight into Redis (as the
job records do), so no API or generation worker is needed here."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from jobstore.webhook_deliveries import delivery_key, due_key, enqueue_delivery, inflight_key
from tests.conftest import REPO_ROOT
from tests.webhooks.test_webhooks import Receiver

SECRET = "whsec_" + base64.b64encode(b"urae-serve test webhook secret!!").decode()


@pytest.fixture(scope="module")
def service_env(service_env: dict[str, str]) -> dict[str, str]:
    return {**service_env, "URAE_WEBHOOK_SECRET": SECRET, "URAE_WEBHOOK_ALLOW_HOSTS": "127.0.0.0/8",
            "URAE_WEBHOOK_TIMEOUT_S": "30", "URAE_WEBHOOK_BACKOFF_S": "0.25"}


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def healthcheck(*args: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    """The containers' healthcheck script, as Docker runs it."""
    return subprocess.run([sys.executable, str(REPO_ROOT / "docker" / "healthcheck.py"), *args],
                          env={**os.environ, "URAE_REDIS_URL": redis_url}, capture_output=True, text=True, timeout=30)


def start_webhook_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "webhooks", "--name", log_path.stem], cwd=REPO_ROOT,
                            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT)


def test_sigterm_with_an_attempt_in_flight_exits_at_once_and_loses_nothing(
        service_env: dict[str, str], redis_url: str, receiver: Receiver, tmp_path: Path) -> None:
    conn = redis.Redis.from_url(redis_url)
    with receiver.lock:
        receiver.scripts["/held"] = [(200, 20.0)]  # the first attempt is answered only after 20 s
    message_id = enqueue_delivery(conn, "0" * 32, "generate", "owner-x", {"url": receiver.url("/held")},
                                  "completed", {"status": "finished"}, ttl_s=600)
    first = start_webhook_worker(service_env, tmp_path / "first.log")
    try:
        receiver.wait("/held", 1, timeout_s=30)
        # The container healthcheck sees it by its heartbeat.
        assert healthcheck("webhooks", "first", redis_url=redis_url).returncode == 0
        assert conn.zscore(inflight_key("owner-x"), message_id) is not None
        started = time.monotonic()
        first.terminate()
        code = first.wait(timeout=15)
        took = time.monotonic() - started
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    print(f"the webhook worker exited {took:.2f} s after SIGTERM with an attempt in flight")
    assert took < 3.0 and code == 0, (took, code, (tmp_path / "first.log").read_text()[-2000:])
    gone = healthcheck("webhooks", "first", redis_url=redis_url)
    assert gone.returncode == 1 and "no live webhook worker named first*" in gone.stderr
    # Handed back: due at once, not counted as an attempt.
    assert conn.zscore(inflight_key("owner-x"), message_id) is None
    assert conn.zscore(due_key("owner-x"), message_id) is not None
    assert b'"attempt":1' in conn.get(delivery_key(message_id))

    second = start_webhook_worker(service_env, tmp_path / "second.log")
    try:
        requests = receiver.wait("/held", 2, timeout_s=30)
        assert {r["headers"]["webhook-id"] for r in requests} == {message_id}  # the same message, again
        deadline = time.monotonic() + 10
        while conn.exists(delivery_key(message_id)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not conn.exists(delivery_key(message_id))  # delivered and retired
    finally:
        second.terminate()
        second.wait(timeout=15)
    conn.close()


def test_deliveries_of_every_key_wait_in_one_place_and_leave_no_keys_behind(
        service_env: dict[str, str], redis_url: str, receiver: Receiver, tmp_path: Path) -> None:
    conn = redis.Redis.from_url(redis_url)
    ids = [enqueue_delivery(conn, "1" * 32, "generate", owner, {"url": receiver.url(f"/many-{owner}")}, "completed",
                            {"status": "finished"}, ttl_s=600) for owner in ("k1", "k2", "", "k1")]
    worker = start_webhook_worker(service_env, tmp_path / "many.log")
    try:
        for owner, count in (("k1", 2), ("k2", 1), ("", 1)):
            receiver.wait(f"/many-{owner}", count, timeout_s=30)
        deadline = time.monotonic() + 10
        while any(conn.exists(delivery_key(i)) for i in ids) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.terminate()
        worker.wait(timeout=15)
    left: Any = sorted(k.decode() for k in conn.scan_iter(match="urae:webhooks:*"))
    assert left == [], left
    conn.close()
