"""A worker that is frozen (SIGSTOP: it stops heartbeating, its sockets stay open) never holds a job that
a healthy worker could run: a frozen worker takes none (workers take jobs with a recorded claim, never
with a blocking pop that Redis would answer for a frozen process too), and a job taken by a worker
that then stops heartbeating before starting it goes back to its queue within the lease."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
import redis

from jobstore.contract import generate_queue
from jobstore.jobs import CLAIMS_KEY, JobRecords
from jobstore.queues import rq_queue_key
from tests.conftest import wait_for_status
from tests.reliability.conftest import SMALL

LEASE_S = 3.0  # URAE_LEASE_TTL_S of the test stack


@pytest.fixture(scope="module")
def healthy(start_worker: Any) -> Any:
    return start_worker("healthy", "--queues", "generate")


def test_a_worker_frozen_while_idle_takes_no_job(http: Any, start_worker: Any, redis_url: str) -> None:
    frozen = start_worker("frozen", "--queues", "generate")
    time.sleep(1.0)  # idle, waiting for work
    frozen.signal(signal.SIGSTOP)
    try:
        other = start_worker("healthy-too", "--queues", "generate")
        submitted = time.monotonic()
        job = wait_for_status(http, http.post("/generate", json=SMALL).json()["id"], timeout_s=60)
        took = time.monotonic() - submitted
        assert job["status"] == "finished", job
        print(f"with a frozen worker idle beside it, a healthy one finished the job in {took:.1f} s")
        assert JobRecords(redis.Redis.from_url(redis_url)).get(job["id"]).get("worker") == "healthy-too"
    finally:
        frozen.signal(signal.SIGCONT)
    # Thawed, it serves again.
    other.stop()
    after = wait_for_status(http, http.post("/generate", json=SMALL).json()["id"], timeout_s=60)
    assert after["status"] == "finished", after
    assert JobRecords(redis.Redis.from_url(redis_url)).get(after["id"]).get("worker") == "frozen"
    frozen.stop()


def test_a_job_taken_by_a_worker_that_stops_heartbeating_goes_back_within_the_lease(
    http: Any, redis_url: str, healthy: Any
) -> None:
    """A worker takes the job and freezes before starting it (simulated: a claim by a worker name with
    no heartbeat, while the healthy worker is itself paused for a moment so it cannot take the job
    first). The job goes back to the front of its queue and the healthy worker runs it; the frozen
    one, thawed, is refused the start."""
    conn = redis.Redis.from_url(redis_url)
    records = JobRecords(conn)
    healthy.signal(signal.SIGSTOP)
    try:
        job_id = http.post("/generate", json={**SMALL, "priority": "low"}).json()["id"]
        taken = records.claim_next([rq_queue_key(generate_queue(p)) for p in ("high", "normal", "low")],
                                   "gone-worker")
        claimed_at = time.monotonic()
    finally:
        healthy.signal(signal.SIGCONT)
    assert taken is not None and taken[1] == job_id
    assert conn.hexists(CLAIMS_KEY, taken[1])
    job = wait_for_status(http, job_id, timeout_s=60)
    took = time.monotonic() - claimed_at
    print(f"the job taken by a worker that stopped heartbeating finished {took:.1f} s after it was taken")
    assert job["status"] == "finished", job
    assert records.get(job_id).get("worker") == "healthy"
    # Back within the lease (3 s) and the reapers' period (0.5 s), plus the job's own few seconds.
    assert took < LEASE_S + 20
    assert not conn.hexists(CLAIMS_KEY, taken[1])
    # Thawed, the frozen worker may not start it.
    assert records.start(job_id, "gone-worker", rq_id=taken[1]) is None
    assert records.get(job_id)["status"] == "finished"
    conn.close()
