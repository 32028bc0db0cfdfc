"""POST /finetune on the tiny model: an isolated training worker registers an adapter /generate uses."""

from __future__ import annotations

import io
import json
import os
import signal
import time
import zipfile
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import wait_for_status

# The shipped 2K recipe, scaled down to the tiny model.
RECIPE = {"recipe": "urae-2k", "adapter_kind": "lora", "rank": 4, "alpha": 4, "resolution": 64,
          "max_sequence_length": 64, "steps": 3, "optimizer": "adamw", "learning_rate": 0.05,
          "mixed_precision": "no", "gradient_checkpointing": False, "checkpoint_every": 0, "sample_every": 0}


def dataset_zip(count: int = 3, folder: str = "pets/") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            y, x = np.mgrid[0:64, 0:64]
            pixels = np.stack([(x * (i + 2)) % 256, (y * 5) % 256, ((x + y) * 3) % 256], -1).astype(np.uint8)
            png = io.BytesIO()
            Image.fromarray(pixels).save(png, format="PNG")
            archive.writestr(f"{folder}img{i}.png", png.getvalue())
            archive.writestr(f"{folder}img{i}.txt", f"a stripe pattern number {i}")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def workers(start_worker: Any, redis_url: str) -> tuple[Any, Any]:
    # Both start at once: each takes seconds to import torch.
    generator = start_worker("gen-ft", "--queues", "generate", wait=False)
    trainer = start_worker("trainer", "--queues", "finetune", wait=False)
    generator.wait_ready(redis_url, "gen-ft")
    trainer.wait_ready(redis_url, "trainer")
    return generator, trainer


def submit(http: Any, recipe: dict[str, Any], adapter_name: str, **data: str) -> Any:
    return http.post("/finetune", data={"adapter_name": adapter_name, "recipe": json.dumps(recipe), **data})


def test_finetune_registers_an_adapter_that_generate_uses(http: Any, workers: Any) -> None:
    response = submit(http, RECIPE, "my-pets", dataset_name="pets")
    assert response.status_code == 404  # no dataset of that name yet
    files = {"dataset": ("pets.zip", dataset_zip(), "application/zip")}
    response = http.post("/finetune", files=files,
                         data={"adapter_name": "my-pets", "dataset_name": "pets", "recipe": json.dumps(RECIPE)})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    job = wait_for_status(http, job_id, timeout_s=120)
    assert job["status"] == "finished", job["error"]
    assert job["result"]["adapter"]["name"] == "my-pets" and job["result"]["steps"] == 3
    assert job["progress"]["stage"] in ("train", "export")

    events = http.get(f"/jobs/{job_id}/events").text
    assert '"stage": "train"' in events and '"loss"' in events and '"eta_s"' in events

    assert http.get("/adapters/my-pets").json()["source"] == "finetune"
    body = {"prompt": "a stripe pattern", "width": 64, "height": 64, "steps": 2, "seed": 3,
            "adapters": [{"name": "my-pets"}]}
    used = wait_for_status(http, http.post("/generate", json=body).json()["id"])
    assert used["status"] == "finished", used["error"]
    assert used["result"]["adapters"][0]["name"] == "my-pets"

    # The dataset stays on the server under its name: a second run can use it without an upload.
    again = http.post("/finetune", data={"adapter_name": "my-pets-2", "dataset_name": "pets",
                                         "recipe": json.dumps({**RECIPE, "steps": 500})})
    assert again.status_code == 202, again.text
    second = again.json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        progress = http.get(f"/jobs/{second}").json()["progress"]
        if progress and progress["stage"] == "train" and progress["step"] >= 1:
            break
        time.sleep(0.05)
    assert http.delete(f"/jobs/{second}").status_code == 202
    canceled = wait_for_status(http, second, timeout_s=60)
    assert canceled["status"] == "canceled"
    assert http.get("/adapters/my-pets-2").status_code == 404


@pytest.mark.parametrize(
    ("recipe", "field"),
    [
        ({"steps": 0}, "recipe.steps"),
        ({"resolution": 100}, "recipe.resolution"),
        ({"optimizer": "sgd"}, "recipe.optimizer"),
        ({"output_dir": "/etc"}, "recipe.output_dir"),
        ({"model_id": "other"}, "recipe.model_id"),
        ({"learning_rat": 1.0}, "recipe.learning_rat"),
        ({"base_adapter": "missing"}, "recipe.base_adapter"),
        ({"recipe": "../../etc/passwd"}, "recipe.recipe"),
        ({"batch_size": 3, "global_batch_size": 8}, "recipe.global_batch_size"),
    ],
)
def test_bad_recipes_are_refused_before_queueing(http: Any, redis_url: str, recipe: dict[str, Any], field: str) -> None:
    before = job_ids(redis_url)
    response = http.post("/finetune", data={"adapter_name": "nope", "dataset_name": "pets", "recipe": json.dumps(recipe)})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert job_ids(redis_url) == before  # no job was created, queued or not


def job_ids(redis_url: str) -> set[str]:
    """The ids of every job record in Redis."""
    import re

    import redis

    from jobstore.contract import job_key

    conn = redis.Redis.from_url(redis_url)
    try:
        names = [k.decode() for k in conn.scan_iter(match=job_key("*"))]
    finally:
        conn.close()
    return {m.group(1) for n in names if (m := re.fullmatch(re.escape(job_key("")) + r"([0-9a-f]{32})", n))}


def test_a_crashing_training_leaves_generation_serving(http: Any, workers: Any, redis_url: str) -> None:
    import redis

    from jobstore.contract import worker_key

    files = {"dataset": ("crash.zip", dataset_zip(), "application/zip")}
    response = http.post("/finetune", files=files, data={"adapter_name": "crash", "dataset_name": "crash-set",
                                                         "recipe": json.dumps({**RECIPE, "steps": 500})})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        progress = http.get(f"/jobs/{job_id}").json()["progress"]
        if progress and progress["stage"] == "train":
            break
        time.sleep(0.05)
    # Kill the training process itself (the forked job process), as an out-of-memory kill would.
    trainer_pid = workers[1].proc.pid
    children = [int(p) for p in os.popen(f"pgrep -P {trainer_pid}").read().split()]
    assert children, "the training job runs in a child process"
    os.kill(children[0], signal.SIGKILL)
    job = wait_for_status(http, job_id, timeout_s=30)
    assert job["status"] == "failed"
    body = {"prompt": "still here", "width": 64, "height": 64, "steps": 2}
    assert wait_for_status(http, http.post("/generate", json=body).json()["id"])["status"] == "finished"
    assert redis.Redis.from_url(redis_url).exists(worker_key("trainer"))  # the training worker itself lives on
