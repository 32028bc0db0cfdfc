"""A real generation worker driving 2 ranks per image (URAE_CONTEXT_PARALLEL=2, gloo on the CPU)."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import numpy as np
import psutil
import pytest
from PIL import Image

from tests.conftest import wait_for_status

# 128x96: 48 image tokens, split over 2 ranks; proportional attention on (URAE's 2k preset settings).
SMALL = {"prompt": "a harbour in fog", "width": 128, "height": 96, "steps": 3, "seed": 5, "preset": "2k"}
LONG = {"prompt": "a slow one", "width": 128, "height": 128, "steps": 100, "seed": 2}


@pytest.fixture(scope="module")
def worker(start_worker: Any) -> Any:
    return start_worker("gen-cp", "--queues", "generate", env={"URAE_CONTEXT_PARALLEL": "2"})


def followers(worker: Any) -> list[psutil.Process]:
    return psutil.Process(worker.proc.pid).children(recursive=True)


def test_the_group_serves_the_one_gpu_image(http: Any, worker: Any) -> None:
    ready = http.get("/ready").json()
    info = ready["workers"][0]
    assert info["context_parallel"] == 2
    assert ready["tiers"] == ["quality"]  # turbo's step cache would split the group
    assert len(followers(worker)) >= 1

    job = wait_for_status(http, http.post("/generate", json=SMALL).json()["id"])
    assert job["status"] == "finished", job.get("error")
    assert {k: job["progress"][k] for k in ("stage", "step", "total")} == {"stage": "decode", "step": 1, "total": 1}
    image = Image.open(io.BytesIO(http.get(job["links"]["images"][0]).content))
    metadata = json.loads(image.info["urae"])
    assert metadata["proportional_attention"] is True

    from urae.generate import Generator
    from urae.spec import AdapterRef, GenerationSpec

    # The one-process image of the same settings, the preset's URAE adapter included.
    fields = ("prompt", "width", "height", "steps", "guidance", "seed", "max_sequence_length", "ntk_factor",
              "proportional_attention", "shift", "preset")
    adapters = tuple(AdapterRef(a["name"], a["weight"]) for a in metadata["adapters"])
    assert adapters  # the adapter went to both ranks
    spec = GenerationSpec(**{k: metadata[k] for k in fields}, adapters=adapters)
    single = Generator.load("tiny", device="cpu", dtype="float32").generate(spec).images[0]
    diff = np.abs(np.asarray(image.convert("RGB"), np.int16) - np.asarray(single, np.int16))
    assert diff.max() <= 1


def test_cancel_stops_the_group_and_it_serves_the_next_job(http: Any, worker: Any) -> None:
    job_id = http.post("/generate", json=LONG).json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = http.get(f"/jobs/{job_id}").json()
        if job["progress"] and job["progress"]["stage"] == "denoise" and job["progress"]["step"] >= 2:
            break
        time.sleep(0.02)
    assert http.delete(f"/jobs/{job_id}").status_code == 202
    job = wait_for_status(http, job_id)
    assert job["status"] == "canceled"
    assert job["progress"]["step"] < job["progress"]["total"]
    # Both ranks left the canceled job at the same step: the next one runs.
    following = wait_for_status(http, http.post("/generate", json={**SMALL, "steps": 1}).json()["id"])
    assert following["status"] == "finished", following


def test_a_size_the_group_cannot_split_fails_with_the_reason(http: Any, worker: Any) -> None:
    job = wait_for_status(http, http.post("/generate", json={**SMALL, "width": 112, "height": 80}).json()["id"])
    assert job["status"] == "failed" and "do not split over the 2 GPUs" in job["error"]


def test_stopping_the_worker_stops_its_ranks(worker: Any) -> None:
    ranks = followers(worker)
    assert ranks
    worker.stop()
    assert worker.proc.returncode == 0
    gone, alive = psutil.wait_procs(ranks, timeout=15)
    assert not alive


def test_a_timed_out_job_fails_and_the_worker_stops_to_be_restarted(
    settings: Any, http: Any, start_worker: Any
) -> None:
    # Rank 0 leaves the job mid-step (RQ's alarm) while rank 1 waits in a collective: the group cannot
    # go on, so the job fails with its reason and the worker exits for its supervisor to restart it.
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.conftest import API_KEY

    worker = start_worker("gen-cp-2", "--queues", "generate", env={"URAE_CONTEXT_PARALLEL": "2"})
    ranks = followers(worker)
    impatient = settings.model_copy(update={"job_timeout_s": 1})
    with TestClient(create_app(impatient), headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        job = wait_for_status(client, client.post("/generate", json=LONG).json()["id"])
    assert job["status"] == "failed" and job["error"] == "timed out after 1 s"
    assert worker.proc.wait(timeout=30) == 0
    gone, alive = psutil.wait_procs(ranks, timeout=15)
    assert not alive
