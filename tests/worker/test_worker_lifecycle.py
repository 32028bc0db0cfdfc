"""Workers that die or are stopped: killed jobs never stay "started", SIGTERM finishes or requeues."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from tests.conftest import make_settings, wait_for_status

LONG = {"prompt": "a slow one", "width": 128, "height": 128, "steps": 100, "seed": 2}
VERY_LONG = {**LONG, "num_images": 4}


@pytest.fixture(scope="module")
def retrying_env(service_env: dict[str, str]) -> dict[str, str]:
    service_env["URAE_RETRY_ORPHANED_JOBS"] = "true"
    return service_env


@pytest.fixture(scope="module")
def api(retrying_env: dict[str, str]) -> Any:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.conftest import API_KEY

    with TestClient(create_app(make_settings(retrying_env)), headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def wait_progress(api: Any, job_id: str, step: int = 2, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        progress = api.get(f"/jobs/{job_id}").json()["progress"]
        if progress and progress["stage"] == "denoise" and progress["step"] >= step:
            return
        time.sleep(0.02)
    raise TimeoutError(f"job {job_id} made no progress")


def test_a_killed_workers_job_is_retried_once_then_failed(api: Any, start_worker: Any) -> None:
    first = start_worker("doomed-1", "--queues", "generate")
    job_id = api.post("/generate", json=LONG).json()["id"]
    wait_progress(api, job_id)
    first.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    job = wait_for_status(api, job_id, ("queued", "failed"), timeout_s=30)
    # Lease TTL 3 s + reaper period 0.5 s in these tests; 20 s + 5 s by default (well under 60 s).
    assert time.monotonic() - killed_at < 10
    assert job["status"] == "queued"

    second = start_worker("doomed-2", "--queues", "generate")
    wait_progress(api, job_id)
    assert api.get(f"/jobs/{job_id}").json()["status"] == "started"
    second.signal(signal.SIGKILL)
    job = wait_for_status(api, job_id, ("failed",), timeout_s=30)
    assert "doomed-2 stopped responding" in job["error"]


def test_sigterm_puts_an_overdue_job_back_and_a_short_one_finishes(api: Any, start_worker: Any) -> None:
    worker = start_worker("stopping-1", "--queues", "generate", env={"URAE_SHUTDOWN_GRACE_S": "1"})
    job_id = api.post("/generate", json=VERY_LONG).json()["id"]
    wait_progress(api, job_id)
    worker.signal(signal.SIGTERM)
    job = wait_for_status(api, job_id, ("queued", "failed", "finished", "canceled"), timeout_s=30)
    assert job["status"] == "queued", job
    assert worker.proc.wait(timeout=30) == 0, worker.output()  # the output says what raised, if anything

    # A generous grace period this time: the short job must finish on a busy machine.
    successor = start_worker("stopping-2", "--queues", "generate", env={"URAE_SHUTDOWN_GRACE_S": "30"})
    wait_progress(api, job_id)  # the job put back runs on the next worker
    assert api.delete(f"/jobs/{job_id}").status_code == 202
    assert wait_for_status(api, job_id)["status"] == "canceled"

    short = api.post("/generate", json={**LONG, "steps": 10, "width": 64, "height": 64}).json()["id"]
    wait_progress(api, short, step=1)
    successor.signal(signal.SIGTERM)
    assert wait_for_status(api, short)["status"] == "finished"
    assert successor.proc.wait(timeout=30) == 0, successor.output()
