"""Faults with real processes: a worker killed mid-job, a job past its timeout, a full disk, a
pickle planted in Redis. After each one the service keeps serving."""

from __future__ import annotations

import io
import json
import pickle
import signal
import struct
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from jobstore.contract import RUNNING_JOBS_KEY, generate_queue, job_key
from tests.conftest import ApiServer, auth, wait_for_status
from tests.reliability.conftest import LONG, SMALL, LimitedApiServer, LimitedWorker, wait_progress


def statuses_in_redis(conn: redis.Redis) -> dict[str, str]:
    out = {}
    for key in conn.scan_iter(match=job_key("*")):
        if key.count(b":") == 2:  # the hash, not :events / :cancel / :lease
            out[key.decode()] = (conn.hget(key, "status") or b"").decode()
    return out


# A 64 px image fits, a 512 px one of the random model does not (~600 KiB): see the full-disk test.
MAX_FILE_BYTES = 96 * 1024


@pytest.fixture(scope="module")
def worker(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LimitedWorker]:
    """The module's generation worker, with a cap on the size of the files it writes (a disk that is
    nearly full); the first test starts it only after killing its own worker."""
    log = tmp_path_factory.mktemp("limited") / "survivor.log"
    limited = LimitedWorker(service_env, ["--name", "survivor", "--queues", "generate"], log, MAX_FILE_BYTES)
    limited.wait_ready(service_env["URAE_REDIS_URL"], "survivor")
    yield limited
    limited.stop()


def test_sigkill_mid_job_fails_it_with_a_reason_and_a_new_worker_serves(
    http: Any, start_worker: Any, redis_url: str, request: pytest.FixtureRequest
) -> None:
    victim = start_worker("victim", "--queues", "generate")
    job_id = http.post("/generate", json=LONG).json()["id"]
    wait_progress(http, job_id)
    victim.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    # No worker is left: the API's own reaper must notice (lease 3 s here; 20 s + 5 s by default).
    job = wait_for_status(http, job_id, timeout_s=60)
    assert time.monotonic() - killed_at < 60
    assert job["status"] == "failed"
    assert "worker victim stopped responding" in job["error"]
    conn = redis.Redis.from_url(redis_url)
    assert not conn.hexists(RUNNING_JOBS_KEY, job_id)
    assert "started" not in statuses_in_redis(conn).values()

    victim.stop()
    request.getfixturevalue("worker")  # a restarted worker
    after = wait_for_status(http, http.post("/generate", json=SMALL).json()["id"])
    assert after["status"] == "finished", after["error"]
    assert http.get(after["links"]["images"][0]).status_code == 200


@pytest.fixture(scope="module")
def short_timeout_api(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = ApiServer({**service_env, "URAE_JOB_TIMEOUT_S": "2"}, tmp_path_factory.mktemp("api-timeout") / "api.log")
    with httpx.Client(base_url=server.url, headers=auth(), timeout=30) as client:
        yield client
    server.stop()


def test_a_job_past_its_timeout_fails_and_the_next_one_runs(short_timeout_api: Any, worker: Any) -> None:
    http = short_timeout_api
    for _ in range(3):  # the timeout may land anywhere in a step: progress, cancel check or compute
        # 512 px x 4 images x 100 steps: far past 2 s even on a fast CPU; the timeout bounds the cost.
        body = {**LONG, "width": 512, "height": 512}
        job = wait_for_status(http, http.post("/generate", json=body).json()["id"], timeout_s=60)
        assert job["status"] == "failed", job
        assert job["error"] == "timed out after 2 s"
        assert job["links"]["images"] == []
    after = wait_for_status(http, http.post("/generate", json=SMALL).json()["id"])
    assert after["status"] == "finished", after["error"]
    assert worker.proc.poll() is None


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_pickle_planted_in_redis_is_never_run_by_a_worker(
    http: Any, worker: Any, redis_url: str, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_RunsCode(marker)))  # the payload really does run code when unpickled
    assert marker.exists()
    marker.unlink()

    conn = redis.Redis.from_url(redis_url)
    evil = "f" * 32
    # What RQ's default (pickle) serializer would store; anyone who can write to Redis can do this.
    conn.hset(f"rq:job:{evil}", mapping={
        "data": zlib.compress(pickle.dumps(_RunsCode(marker))), "status": "queued", "origin": generate_queue("normal"),
        "created_at": "2026-01-01T00:00:00.000000Z", "enqueued_at": "2026-01-01T00:00:00.000000Z",
        "description": "planted", "timeout": "60",
    })
    conn.rpush(f"rq:queue:{generate_queue('normal')}", evil)
    conn.sadd("rq:queues", f"rq:queue:{generate_queue('normal')}")

    after = wait_for_status(http, http.post("/generate", json=SMALL).json()["id"])
    assert after["status"] == "finished", after["error"]
    assert conn.llen(f"rq:queue:{generate_queue('normal')}") == 0  # the planted job was taken, and refused
    assert not marker.exists()
    assert worker.proc.poll() is None
    assert http.get("/ready").json()["live_workers"] == 1


def test_a_full_disk_fails_the_job_leaves_no_partial_file_and_the_worker_serves_on(
    http: Any, worker: LimitedWorker, service_env: dict[str, str]
) -> None:
    job = wait_for_status(http, http.post("/generate", json={**SMALL, "width": 512, "height": 512}).json()["id"])
    assert job["status"] == "failed", job
    assert "cannot write" in job["error"] and "File too large" in job["error"]
    job_dir = Path(service_env["URAE_STORAGE_DIR"]) / "jobs" / job["id"]
    assert not job_dir.exists() or list(job_dir.iterdir()) == []
    assert worker.proc.poll() is None

    after = wait_for_status(http, http.post("/generate", json=SMALL).json()["id"])
    assert after["status"] == "finished", after["error"]
    assert http.get(after["links"]["images"][0]).headers["content-type"] == "image/png"


def _safetensors(nbytes: int) -> bytes:
    count = nbytes // 4
    header = json.dumps({"x.lora_A.weight": {"dtype": "F32", "shape": [count], "data_offsets": [0, 4 * count]}})
    return struct.pack("<Q", len(header)) + header.encode() + b"\0" * (4 * count)


def _noise_dataset(images: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(images):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(png, format="PNG")
            archive.writestr(f"img{i}.png", png.getvalue())
            archive.writestr(f"img{i}.txt", "noise")
    return buffer.getvalue()


@pytest.mark.parametrize("size", [200 * 1024, 3 * 1024 * 1024], ids=["stored", "spooled-by-the-parser"])
def test_a_full_disk_during_an_upload_is_507_with_retry_after_and_leaves_nothing(
    service_env: dict[str, str], tmp_path: Path, size: int
) -> None:
    # 200 KiB passes the form parser in memory and fails where the API stores it; 3 MiB already fails
    # while the form parser spools it to the temp folder.
    temp = tmp_path / "tmp"
    temp.mkdir()
    api = LimitedApiServer({**service_env, "TMPDIR": str(temp)}, tmp_path / "api.log", 64 * 1024)
    storage = Path(service_env["URAE_STORAGE_DIR"])
    before = {p for p in storage.rglob("*") if p.is_file()}
    try:
        with httpx.Client(base_url=api.url, headers=auth(), timeout=60) as http:
            answers = {
                "adapter": http.post("/adapters", files={"file": ("a.safetensors", _safetensors(size))},
                                     data={"name": f"full-disk-{size}"}),
                "dataset": http.post("/finetune", files={"dataset": ("d.zip", _noise_dataset(size // 40_000 + 1))},
                                     data={"adapter_name": f"full-disk-{size}", "dataset_name": f"full-disk-{size}",
                                           "recipe": json.dumps({"resolution": 64})}),
            }
            for what, response in answers.items():
                assert response.status_code == 507, (what, response.status_code, response.text)
                assert "out of storage space" in response.json()["detail"]
                assert int(response.headers["Retry-After"]) > 0
            assert http.get("/health").status_code == 200
            assert http.get(f"/datasets/full-disk-{size}").status_code == 404
            assert http.get(f"/adapters/full-disk-{size}").status_code == 404
    finally:
        api.stop()
    after = {p for p in storage.rglob("*") if p.is_file()}
    assert after - before == set()
    assert [p for p in temp.rglob("*") if p.is_file()] == []
    assert "Traceback" not in api.log_path.read_text()


def test_the_timeout_alarm_is_not_swallowed_by_the_per_step_cancel_check(
    settings: Any, redis_url: str, tmp_path: Path
) -> None:
    from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty

    from jobstore.jobs import JobRecords
    from jobstore.queues import connect
    from jobstore.storage import LocalStorage
    from worker.jobs import _should_stop
    from worker.runtime import Runtime

    class SlowRedisRecords(JobRecords):
        def cancel_requested(self, job_id: str) -> bool:
            time.sleep(3)  # a slow round trip: RQ's alarm goes off in the middle of it
            return False

    conn = connect(redis_url)
    rt = Runtime(settings, "alarm", conn, SlowRedisRecords(conn), LocalStorage(tmp_path))
    check = _should_stop(rt, "0" * 32)
    started = time.monotonic()
    with pytest.raises(JobTimeoutException), UnixSignalDeathPenalty(1, JobTimeoutException, job_id="alarm"):
        check()
    assert time.monotonic() - started < 2.5
