"""The whole service on each storage backend, with nothing shared through a local disk.

The API and every worker get DIFFERENT local folders (data, cache, temp). With a local storage
folder only that folder is shared; with S3 the processes share nothing but Redis and the object
store (SeaweedFS), as on separate hosts. The same flows run on both: generate and download the
images, upload an adapter and use it, fine-tune and use the result. On S3 also: the store going down
during uploads and jobs, and coming back without restarting anything; two generation workers on two
"hosts" sharing the work, and one of them killed mid-job.
"""

from __future__ import annotations

import io
import json
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import (
    API_KEY,
    S3_BUCKET,
    ApiServer,
    SeaweedServer,
    WorkerProcess,
    auth,
    wait_for_status,
)

SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 5}
RECIPE = {"recipe": "urae-2k", "adapter_kind": "lora", "rank": 4, "alpha": 4, "resolution": 64,
          "max_sequence_length": 64, "steps": 2, "optimizer": "adamw", "learning_rate": 0.05,
          "mixed_precision": "no", "gradient_checkpointing": False, "checkpoint_every": 0, "sample_every": 0}


@dataclass
class Stack:
    backend: str
    root: Path
    service_env: dict[str, str]
    storage_env: dict[str, str]
    api: ApiServer
    http: httpx.Client
    workers: dict[str, WorkerProcess] = field(default_factory=dict)

    def host_env(self, host: str) -> dict[str, str]:
        """Everything a process on its own "host" needs: its own folders, the shared storage."""
        own = self.root / host
        return {**self.service_env, **self.storage_env, "URAE_STORAGE_DIR": str(own / "data"),
                "URAE_CACHE_DIR": str(own / "cache"), "URAE_ADAPTER_CACHE_DIR": str(own / "builtin-adapters"),
                "TMPDIR": str(self.mkdir(own / "tmp"))}

    @staticmethod
    def mkdir(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start_worker(self, name: str, *args: str, wait: bool = True, env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess({**self.host_env(name), **(env or {})}, ["--name", name, *args],
                               self.mkdir(self.root / "logs") / f"{name}.log")
        self.workers[name] = worker
        if wait:
            worker.wait_ready(self.service_env["URAE_REDIS_URL"], name)
        return worker

    def local_files(self, host: str, pattern: str) -> list[Path]:
        return [p for p in (self.root / host).rglob(pattern) if p.is_file()]


@pytest.fixture(scope="module", params=["local", "s3"])
def stack(request: pytest.FixtureRequest, service_env: dict[str, str],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp(f"hosts-{request.param}")
    if request.param == "s3":
        s3: SeaweedServer = request.getfixturevalue("s3_server")
        storage_env = s3.env(s3.create_bucket(S3_BUCKET), prefix=f"e2e-{uuid.uuid4().hex[:8]}")
    else:
        storage_env = {"URAE_STORAGE_URL": str(Stack.mkdir(root / "shared-storage"))}
    partial = Stack(request.param, root, service_env, storage_env, api=None, http=None)  # type: ignore[arg-type]
    api_env = partial.host_env("api-host")
    partial.api = ApiServer(api_env, Stack.mkdir(root / "logs") / "api.log")
    partial.http = httpx.Client(base_url=partial.api.url, headers=auth(API_KEY), timeout=60)
    # All start at once: each takes seconds to import torch. On S3 a second generation host joins.
    names = ["gen-host-a", "train-host"] + (["gen-host-b"] if request.param == "s3" else [])
    for name in names:
        partial.start_worker(name, "--queues", "finetune" if name == "train-host" else "generate", wait=False)
    for name in names:
        partial.workers[name].wait_ready(service_env["URAE_REDIS_URL"], name)
    yield partial
    partial.http.close()
    for worker in partial.workers.values():
        worker.stop()
    partial.api.stop()


def finished(http: httpx.Client, body: dict[str, Any], timeout_s: float = 60) -> dict[str, Any]:
    job = wait_for_status(http, http.post("/generate", json=body).json()["id"], timeout_s=timeout_s)
    assert job["status"] == "finished", job["error"]
    return job


def pixels(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"), dtype=np.int16)


def dataset_zip(count: int = 2) -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            y, x = np.mgrid[0:64, 0:64]
            image = np.stack([(x * (i + 2)) % 256, (y * 5) % 256, ((x + y) * 3) % 256], -1).astype(np.uint8)
            png = io.BytesIO()
            Image.fromarray(image).save(png, format="PNG")
            archive.writestr(f"img{i}.png", png.getvalue())
            archive.writestr(f"img{i}.txt", f"a stripe pattern number {i}")
    return buffer.getvalue()


def test_generate_and_download_the_images(stack: Stack) -> None:
    job = finished(stack.http, {**SMALL, "num_images": 2, "output_format": "webp"})
    for index, link in enumerate(job["links"]["images"]):
        response = stack.http.get(link)
        assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
        assert int(response.headers["content-length"]) == len(response.content)
        assert Image.open(io.BytesIO(response.content)).size == (64, 64), index
    # The API never held the images on its disk: it streamed them from storage.
    assert stack.local_files("api-host", "*.webp") == []
    assert stack.local_files("gen-host-a", "*.webp") == []  # the worker's staging file is gone too
    assert stack.http.get(f"/jobs/{job['id']}/images/2").status_code == 404


def test_an_uploaded_adapter_is_used_by_a_worker_on_another_host(stack: Stack, tmp_path: Path) -> None:
    from urae.adapters import save_lora
    from urae.adapters.builtin import tiny_lora_layers
    from urae.tiny import build_tiny_pipeline

    src = save_lora(tmp_path / "style.safetensors", tiny_lora_layers(build_tiny_pipeline("tiny").transformer, 11))
    with open(src, "rb") as f:
        response = stack.http.post("/adapters", files={"file": ("style.safetensors", f, "application/octet-stream")},
                                   data={"name": f"style-{stack.backend}"})
    assert response.status_code == 201, response.text
    plain = pixels(stack.http.get(finished(stack.http, SMALL)["links"]["images"][0]).content)
    # Weight 4: a change far above the 1-level noise of other CPU kernels.
    styled_job = finished(stack.http, {**SMALL, "adapters": [{"name": f"style-{stack.backend}", "weight": 4.0}]})
    styled = pixels(stack.http.get(styled_job["links"]["images"][0]).content)
    assert np.abs(styled - plain).max() > 2  # the adapter changed the image
    # The upload was spooled on the API's host and handed over through storage, not a shared folder.
    assert stack.local_files("api-host", "*.safetensors") == []
    if stack.backend == "s3":
        # The worker's copy sits in its own cache, named by the content hash of the stored object.
        cached = [p for host in ("gen-host-a", "gen-host-b") for p in stack.local_files(host, "sha256-*.safetensors")]
        assert cached, "the worker read the adapter through its content-hash cache"


def test_finetune_on_one_host_and_use_the_adapter_on_another(stack: Stack) -> None:
    name = f"pets-{stack.backend}"
    response = stack.http.post(
        "/finetune", files={"dataset": ("pets.zip", dataset_zip(), "application/zip")},
        data={"adapter_name": f"ft-{stack.backend}", "dataset_name": name, "recipe": json.dumps(RECIPE)})
    assert response.status_code == 202, response.text
    job = wait_for_status(stack.http, response.json()["id"], timeout_s=120)
    assert job["status"] == "finished", job["error"]
    used = finished(stack.http, {**SMALL, "adapters": [{"name": f"ft-{stack.backend}"}]})
    assert used["result"]["adapters"][0]["name"] == f"ft-{stack.backend}"
    assert stack.http.get(used["links"]["images"][0]).status_code == 200
    # The second upload under the same name is refused: the dataset is stored once.
    again = stack.http.post(
        "/finetune", files={"dataset": ("pets.zip", dataset_zip(), "application/zip")},
        data={"adapter_name": "other", "dataset_name": name, "recipe": json.dumps(RECIPE)})
    assert again.status_code == 409, again.text
    if stack.backend == "s3":
        assert stack.local_files("api-host", "img0.png") == []  # spooled, stored, then removed
        assert stack.local_files("train-host", "img0.png")  # the trainer's cached copy of the dataset


# Object-store-only behaviour: these run on the S3 stack alone (the local backend always streams, has
# no store to stop, and its hosts share a folder).
S3_ONLY = pytest.mark.parametrize("stack", ["s3"], indirect=True)


@S3_ONLY
def test_presigned_downloads_redirect_to_the_object_store(stack: Stack) -> None:
    env = {**stack.host_env("api-presigned"), "URAE_S3_PRESIGNED_DOWNLOADS": "true", "URAE_S3_PRESIGNED_TTL_S": "60"}
    api = ApiServer(env, stack.root / "logs" / "api-presigned.log")
    try:
        job = finished(stack.http, SMALL)
        link = f"{api.url}{job['links']['images'][0]}"
        redirect = httpx.get(link, headers=auth(API_KEY))
        assert redirect.status_code == 307 and "Signature" in redirect.headers["location"]
        followed = httpx.get(link, headers=auth(API_KEY), follow_redirects=True)
        assert followed.status_code == 200
        assert followed.content == stack.http.get(job["links"]["images"][0]).content
        assert httpx.get(link).status_code == 401  # the link itself still needs a key
    finally:
        api.stop()


def wait_for_store_wait(http: httpx.Client, job_id: str, timeout_s: float = 60) -> dict[str, Any]:
    """Until the job is started and its progress says it waits for the object store."""
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = http.get(f"/jobs/{job_id}").json()
        if job["status"] == "started" and (job.get("progress") or {}).get("stage") == "store":
            return job
        assert job["status"] in ("queued", "started"), job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} never waited for the store: {job}")


def store_progress(http: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """The job's progress events of the store stage (from its event stream)."""
    lines = http.get(f"/jobs/{job_id}/events").text.splitlines()
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    return [e for e in events if e.get("type") == "progress" and e.get("stage") == "store"]


@S3_ONLY
def test_the_store_going_down_gives_clear_errors_and_recovers_without_restarts(
    stack: Stack, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    s3: SeaweedServer = request.getfixturevalue("s3_server")
    from urae.adapters import save_lora
    from urae.adapters.builtin import tiny_lora_layers
    from urae.tiny import build_tiny_pipeline

    src = save_lora(tmp_path / "down.safetensors", tiny_lora_layers(build_tiny_pipeline("tiny").transformer, 7))
    s3.stop()
    try:
        with open(src, "rb") as f:
            upload = stack.http.post("/adapters", files={"file": ("down.safetensors", f, "application/octet-stream")},
                                     data={"name": "down"})
        assert upload.status_code == 503 and "object store is unavailable" in upload.json()["detail"]
        assert upload.headers["retry-after"]
        assert stack.http.get("/adapters/down").status_code == 404
        assert stack.local_files("api-host", "*.safetensors") == []  # the spooled upload is gone

        dataset = stack.http.post(
            "/finetune", files={"dataset": ("d.zip", dataset_zip(), "application/zip")},
            data={"adapter_name": "never", "dataset_name": "down-set", "recipe": json.dumps(RECIPE)})
        assert dataset.status_code == 503, dataset.text

        # Generations go on: each finished image is kept on its worker, which tries the store again with
        # backoff; the job stays started and says why.
        held = [stack.http.post("/generate", json={**SMALL, "seed": s}).json()["id"] for s in range(4)]
        wait_for_store_wait(stack.http, held[0])
        time.sleep(10)  # far past botocore's few quick attempts
        statuses = [stack.http.get(f"/jobs/{j}").json()["status"] for j in held]
        assert "failed" not in statuses and "finished" not in statuses, statuses
        # A host whose images wait for the store takes no further job: this one stays queued.
        held.append(stack.http.post("/generate", json={**SMALL, "seed": 9}).json()["id"])
        time.sleep(3)
        assert stack.http.get(f"/jobs/{held[-1]}").json()["status"] == "queued"
        assert stack.http.get("/ready").status_code == 503
    finally:
        s3.start()
    assert stack.http.get("/ready").json()["storage"] == "ok"
    # Nothing computed was lost: the held images are stored, the waiting jobs run.
    for job_id in held:
        job = wait_for_status(stack.http, job_id, timeout_s=120)
        assert job["status"] == "finished", job
        image = stack.http.get(job["links"]["images"][0])
        assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (64, 64)
    assert {e["stage"] for e in store_progress(stack.http, held[0])} == {"store"}
    # The refused dataset left no files.
    client, prefix = s3.client(), stack.storage_env["URAE_STORAGE_URL"].split("/", 3)[3]
    assert client.list_objects_v2(Bucket=S3_BUCKET, Prefix=f"{prefix}/datasets/down-set/").get("KeyCount", 0) == 0

    # Back up: the same API and worker processes serve again.
    after = finished(stack.http, SMALL)
    assert stack.http.get(after["links"]["images"][0]).status_code == 200
    with open(src, "rb") as f:
        upload = stack.http.post("/adapters", files={"file": ("down.safetensors", f, "application/octet-stream")},
                                 data={"name": "down"})
    assert upload.status_code == 201, upload.text


@S3_ONLY
def test_two_hosts_share_the_work_and_a_killed_hosts_job_ends(stack: Stack) -> None:
    from jobstore.jobs import JobRecords
    from jobstore.queues import connect

    second = stack.workers["gen-host-b"]
    ids = [stack.http.post("/generate", json={**SMALL, "seed": s, "steps": 4}).json()["id"] for s in range(8)]
    jobs = [wait_for_status(stack.http, job_id) for job_id in ids]
    assert [j["status"] for j in jobs] == ["finished"] * 8
    records = JobRecords(connect(stack.service_env["URAE_REDIS_URL"]))
    ran_on = {records.get(job_id).get("worker") for job_id in ids}
    assert ran_on == {"gen-host-a", "gen-host-b"}  # both hosts took jobs
    for job in jobs:  # and every image is downloadable through the API, whichever host made it
        assert stack.http.get(job["links"]["images"][0]).status_code == 200

    # Kill host B while it runs a long job: the job ends failed (or is retried), never "started".
    long_job = None
    for _ in range(6):
        response = stack.http.post("/generate", json={**SMALL, "width": 128, "height": 128, "steps": 100})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and records.get(job_id)["status"] != "started":
            time.sleep(0.05)
        if records.get(job_id).get("worker") == "gen-host-b":
            long_job = job_id
            break
        stack.http.delete(f"/jobs/{job_id}")
        wait_for_status(stack.http, job_id)
    assert long_job is not None, "host B never took a job"
    second.signal(signal.SIGKILL)
    job = wait_for_status(stack.http, long_job, ("failed", "queued"), timeout_s=30)
    if job["status"] == "queued":  # retried: host A finishes it
        job = wait_for_status(stack.http, long_job, ("finished", "failed"), timeout_s=120)
    else:
        assert "gen-host-b stopped responding" in job["error"]


@S3_ONLY
@pytest.mark.slow
def test_a_training_put_back_by_a_shutdown_resumes_on_another_host(stack: Stack) -> None:
    """SIGTERM during a fine-tune: past the grace the job goes back with its checkpoints in the store,
    and a trainer on another host continues from the last one instead of step 0."""
    response = stack.http.post(
        "/finetune", files={"dataset": ("r.zip", dataset_zip(), "application/zip")},
        data={"adapter_name": "resumed", "dataset_name": "resume-set",
              "recipe": json.dumps({**RECIPE, "steps": 120, "checkpoint_every": 10})})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        progress = stack.http.get(f"/jobs/{job_id}").json()["progress"]
        if progress and progress["stage"] == "train" and progress["step"] >= 25:
            break
        time.sleep(0.05)
    stack.workers["train-host"].stop(timeout_s=60)  # SIGTERM; the grace in these tests is 2 s
    assert stack.http.get(f"/jobs/{job_id}").json()["status"] == "queued"
    stack.start_worker("train-host-b", "--queues", "finetune")
    job = wait_for_status(stack.http, job_id, timeout_s=600)  # room for a loaded machine
    assert job["status"] == "finished", job["error"]
    events = [json.loads(line[len("data: "):]) for line in stack.http.get(f"/jobs/{job_id}/events").text.splitlines()
              if line.startswith("data: ")]
    requeued = max(i for i, e in enumerate(events) if e.get("status") == "queued")
    after = [e for e in events[requeued:] if e.get("stage") == "train" and e.get("step")]
    assert after and after[0]["step"] > 10, after[:3]  # continued from a checkpoint (every 10 steps)
    assert job["result"]["steps"] == 120
