"""Images are encoded and stored off the critical path: the next job denoises while the previous
job's PNG is written, and a job is reported finished only once its file is complete."""

from __future__ import annotations

import io
import threading
import time
from typing import Any

import pytest
from PIL import Image

from tests.conftest import wait_for_status
from worker.image_writer import ImageWriter

# 1024 px at zlib level 9: the tiny model's noisy output takes a good fraction of a second to
# encode, far longer than the worker needs to pick up the next queued job.
BIG = {"prompt": "a harbour at night", "width": 1024, "height": 1024, "steps": 2}


@pytest.fixture(scope="module")
def worker(start_worker: Any) -> Any:
    return start_worker("writer-1", "--queues", "generate", env={"URAE_PNG_COMPRESS_LEVEL": "9"})


def test_next_job_denoises_while_the_previous_image_is_written(http: Any, worker: Any) -> None:
    first = http.post("/generate", json={**BIG, "seed": 1}).json()["id"]
    second = http.post("/generate", json={**BIG, "seed": 2}).json()["id"]
    jobs = [wait_for_status(http, job_id, ("finished", "failed"), timeout_s=240) for job_id in (first, second)]
    assert [j["status"] for j in jobs] == ["finished", "finished"], [j.get("error") for j in jobs]
    a, b = (j["timings"] for j in jobs)

    # the second job's denoise started before the first job's image was written...
    assert a["write_started_at"] < b["denoise_started_at"] < a["write_ended_at"], (a, b)
    # ...and each job ended only after its own write
    for job, t in zip(jobs, (a, b), strict=True):
        assert t["write_ended_at"] <= job["ended_at"] + 1e-3
        assert t["write"] > 0

    for job_id, seed in ((first, 1), (second, 2)):
        response = http.get(f"/jobs/{job_id}/images/0")
        assert response.status_code == 200
        image = Image.open(io.BytesIO(response.content))
        image.load()  # a truncated file raises here
        assert image.size == (1024, 1024)
        assert image.info["urae"] and f'"seed":{seed}' in image.info["urae"]


def test_peak_memory_in_the_job_record_and_metrics(http: Any, worker: Any) -> None:
    job_id = http.post("/generate", json={"prompt": "a small one", "width": 64, "height": 64, "steps": 2}).json()["id"]
    job = wait_for_status(http, job_id, ("finished", "failed"), timeout_s=120)
    assert job["status"] == "finished", job.get("error")
    # a CPU worker reports how far its RSS rose during the job
    assert job["timings"]["peak_rss_delta_bytes"] >= 0
    assert "peak_gpu_memory_bytes" not in job["timings"]

    text = http.get("/metrics").text
    counts = {
        line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("urae_job_peak_memory_bytes_count")
    }
    assert counts['measure="rss_delta"'] >= 1
    assert counts['measure="gpu_memory"'] == 0
    assert "# TYPE urae_job_peak_memory_bytes histogram" in text


def test_writer_runs_tasks_in_order_and_close_waits_for_them() -> None:
    writer = ImageWriter(max_pending=1)
    done: list[int] = []
    release = threading.Event()

    def task(i: int) -> None:
        release.wait(5)
        done.append(i)

    writer.submit(lambda: task(0))
    writer.submit(lambda: task(1))  # waits in the queue (max_pending 1 is now full)
    blocked = threading.Thread(target=writer.submit, args=(lambda: task(2),))
    blocked.start()
    time.sleep(0.2)
    assert blocked.is_alive(), "submit did not push back while the queue was full"
    release.set()
    blocked.join(5)
    writer.close()
    assert done == [0, 1, 2]


def test_a_failing_task_does_not_stop_the_writer() -> None:
    writer = ImageWriter()
    done: list[str] = []
    writer.submit(lambda: 1 / 0)  # type: ignore[func-returns-value]
    writer.submit(lambda: done.append("after"))
    writer.close()
    assert done == ["after"]
