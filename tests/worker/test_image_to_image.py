"""Image to image and refine end to end: the API on a real uvicorn socket, a real generation worker
process (tiny model), real Redis and storage."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from jobstore.contract import FINETUNE_QUEUE, GENERATE_QUEUES, JobKind, job_key, preset_size
from jobstore.jobs import JobRecords, new_job_id
from jobstore.queues import rq_queue_key
from jobstore.settings import hash_api_key
from service.auth import key_id_of
from tests.conftest import API_KEY, auth, wait_for_status

OTHER_KEY = "other-key-0123456789"
DRAFT = {"prompt": "a lighthouse on a cliff", "width": 128, "height": 64, "steps": 4, "seed": 5}
# Keeps the worker busy while requests queue behind it; canceled once it has served.
LONG = {"prompt": "a slow one", "width": 128, "height": 128, "steps": 100, "seed": 2}


@pytest.fixture(scope="module")
def service_env(service_env: dict[str, str]) -> dict[str, str]:
    return {**service_env, "URAE_API_KEYS": f"{API_KEY},{OTHER_KEY}"}


@pytest.fixture(scope="module")
def worker(start_worker: Any) -> Any:
    return start_worker("gen-i2i", "--queues", "generate")


@pytest.fixture(scope="module")
def conn(service_env: dict[str, str]) -> Any:
    return redis.Redis.from_url(service_env["URAE_REDIS_URL"])


@pytest.fixture(scope="module")
def other(api_server: Any) -> Any:
    with httpx.Client(base_url=api_server.url, headers=auth(OTHER_KEY), timeout=30) as c:
        yield c


def source_png(width: int = 96, height: int = 64) -> bytes:
    # A gradient, not a flat colour: the input decides much of the result.
    pixels = np.linspace(0, 255, width * height * 3).reshape(height, width, 3).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def finished(http: Any, body: dict[str, Any], url: str = "/generate") -> dict[str, Any]:
    response = http.post(url, json=body)
    assert response.status_code == 202, response.text
    job = wait_for_status(http, response.json()["id"], timeout_s=120)
    assert job["status"] == "finished", job["error"]
    return job


def image_of(http: Any, job: dict[str, Any], index: int = 0) -> Image.Image:
    response = http.get(f"/jobs/{job['id']}/images/{index}")
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def queued(conn: Any) -> int:
    return sum(int(conn.llen(rq_queue_key(q))) for q in GENERATE_QUEUES)


def uploads(service_env: dict[str, str]) -> list[str]:
    folder = Path(service_env["URAE_STORAGE_DIR"]) / "uploads"
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def denoise_totals(http: Any, job_id: str) -> set[int]:
    totals: set[int] = set()
    name = ""
    with http.stream("GET", f"/jobs/{job_id}/events", timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: ") and name == "progress":
                event = json.loads(line.removeprefix("data: "))
                if event["stage"] == "denoise":
                    totals.add(event["total"])
    return totals


def started(http: Any, job_id: str) -> None:
    wait_for_status(http, job_id, ("started",), timeout_s=60)


def test_a_data_url_input_runs_the_schedules_tail_and_goes_with_its_job(
    http: Any, worker: Any, conn: Any, service_env: dict[str, str],
) -> None:
    response = http.post("/generate", json={**DRAFT, "image": data_url(source_png()), "strength": 0.5})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    key = json.loads(conn.hget(job_key(job_id), "payload"))["image"]["key"]
    # The worker runs the last half of the 4 steps, and says so in its progress.
    assert denoise_totals(http, job_id) == {2}
    job = wait_for_status(http, job_id)
    assert job["status"] == "finished", job["error"]
    result = job["result"]
    assert result["strength"] == 0.5 and result["steps"] == 4 and result["steps_run"] == 2
    assert result["input_image"] == {"upload": True, "width": 96, "height": 64, "strength": 0.5, "skipped_steps": 2,
                                     "encode": "full"}
    image = image_of(http, job)
    assert image.size == (128, 64)
    metadata = json.loads(image.info["urae"])
    assert metadata["strength"] == 0.5 and metadata["input_image"]["width"] == 96
    # The job owned its input: gone once it ended.
    assert key == f"uploads/{job_id}.input.png"
    assert not (Path(service_env["URAE_STORAGE_DIR"]) / key).exists()
    # The input decided the result: not the text-to-image picture of the seed.
    plain = image_of(http, finished(http, DRAFT))
    assert np.abs(pixels(image) - pixels(plain)).max() > 10


def test_strength_one_is_the_text_to_image_job_of_the_same_seed(http: Any, worker: Any) -> None:
    plain = image_of(http, finished(http, DRAFT))
    full = finished(http, {**DRAFT, "image": data_url(source_png()), "strength": 1.0})
    assert full["result"]["strength"] == 1.0 and full["result"]["steps_run"] == 4
    assert np.abs(pixels(image_of(http, full)) - pixels(plain)).max() <= 2


def test_an_image_of_an_earlier_job_is_an_input(http: Any, worker: Any, service_env: dict[str, str]) -> None:
    draft = finished(http, {**DRAFT, "num_images": 2})
    body = {"prompt": "a lighthouse in a storm", "width": 192, "height": 96, "steps": 4, "seed": 9,
            "image": {"job": draft["id"], "index": 1}, "strength": 0.75}
    job = finished(http, body)
    assert image_of(http, job).size == (192, 96)
    assert job["result"]["input_image"] == {"job": draft["id"], "index": 1, "width": 128, "height": 64,
                                            "strength": 0.75, "skipped_steps": 1, "encode": "full"}
    # Another job's image is read, never taken: the draft keeps it.
    assert http.get(f"/jobs/{draft['id']}/images/1").status_code == 200
    # Which image was named matters: image 0 (another seed) gives another result.
    other = finished(http, {**body, "image": {"job": draft["id"], "index": 0}})
    assert np.abs(pixels(image_of(http, other)) - pixels(image_of(http, job))).max() > 10


@pytest.fixture(scope="module")
def lora_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from urae.adapters import save_lora
    from urae.adapters.builtin import tiny_lora_layers
    from urae.tiny import build_tiny_pipeline

    return save_lora(tmp_path_factory.mktemp("lora") / "style.safetensors",
                     tiny_lora_layers(build_tiny_pipeline("tiny").transformer, 11))


def upload_adapter(http: Any, name: str, path: Path) -> str:
    with open(path, "rb") as f:
        response = http.post("/adapters", files={"file": ("style.safetensors", f, "application/octet-stream")},
                             data={"name": name})
    assert response.status_code == 201, response.text
    return name


@pytest.fixture(scope="module")
def style(http: Any, worker: Any, lora_path: Path) -> str:
    return upload_adapter(http, "i2i-style", lora_path)


def test_refine_keeps_prompt_seed_and_adapters_at_the_target_size(http: Any, worker: Any, style: str) -> None:
    draft = finished(http, {"prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 2, "seed": 40,
                            "num_images": 2, "adapters": [{"name": style, "weight": 0.7}]})
    response = http.post(f"/jobs/{draft['id']}/refine", json={"width": 128, "height": 128, "index": 1, "strength": 0.1})
    assert response.status_code == 202, response.text
    refined_id = response.json()["id"]
    assert response.headers["location"] == f"/jobs/{refined_id}" and response.json()["status"] in ("queued", "started")
    job = wait_for_status(http, refined_id, timeout_s=120)
    assert job["status"] == "finished", job["error"]
    result = job["result"]
    # Image 1 of the draft was made with seed 40 + 1; the target's preset brings its steps.
    assert result["seed"] == 41 and (result["width"], result["height"]) == (128, 128) and result["preset"] == "1k"
    assert result["strength"] == 0.1 and result["steps"] == 28 and result["steps_run"] == 3
    assert {a["name"]: a["weight"] for a in result["adapters"]} == {style: 0.7}
    assert result["input_image"]["job"] == draft["id"] and result["input_image"]["index"] == 1
    image = image_of(http, job)
    assert image.size == (128, 128)
    metadata = json.loads(image.info["urae"])
    assert metadata["prompt"] == "a red fox in the snow" and metadata["seed"] == 41


def test_refine_to_a_preset_keeps_the_drafts_aspect_ratio(http: Any, worker: Any, conn: Any) -> None:
    # A draft of an explicit size: scaled to the preset's pixel count, sides multiples of 16.
    draft = finished(http, {**DRAFT, "steps": 2})
    job = finished(http, {"preset": "1k", "strength": 0.03}, url=f"/jobs/{draft['id']}/refine")
    width, height = job["result"]["width"], job["result"]["height"]
    assert job["result"]["preset"] == "1k" and job["result"]["steps_run"] == 1
    assert width % 16 == 0 and height % 16 == 0
    assert abs(width / height - 2.0) < 0.03 and abs(width * height / 1024**2 - 1) < 0.03
    assert image_of(http, job).size == (width, height)
    # The draft's framing, not a size: the worker sizes the preset at its model's own scale (mini's 2K is
    # 256 px, not 2048), as for any preset request.
    payload = JobRecords(conn).get(job["id"])["payload"]
    assert (payload["width"], payload["height"], payload["aspect_ratio"]) == (None, None, "2:1"), payload
    # A draft of a named aspect ratio: that ratio at the preset.
    named = finished(http, {"prompt": "a harbour", "preset": "1k", "aspect_ratio": "16:9", "steps": 1, "seed": 3})
    job = finished(http, {"preset": "1k", "strength": 0.03}, url=f"/jobs/{named['id']}/refine")
    assert (job["result"]["width"], job["result"]["height"]) == preset_size("1k", "16:9")
    assert job["result"]["seed"] == 3


def test_references_to_jobs_that_cannot_serve_are_refused_and_nothing_is_queued(
    http: Any, other: Any, worker: Any, conn: Any, service_env: dict[str, str],
) -> None:
    mine = finished(http, DRAFT)["id"]
    theirs = finished(other, DRAFT)["id"]
    training = new_job_id()  # a job of another kind, the caller's own (never run: no training worker here)
    JobRecords(conn).create_and_enqueue(training, JobKind.FINETUNE, FINETUNE_QUEUE, {"job_id": training},
                                        owner=key_id_of(hash_api_key(API_KEY)))
    busy = http.post("/generate", json=LONG).json()["id"]
    started(http, busy)
    waiting = http.post("/generate", json=DRAFT).json()["id"]
    missing = new_job_id()
    try:
        cases = [
            # (reference, status, field, words)
            ({"job": missing}, 404, "image.job", f"job {missing} not found"),
            ({"job": theirs}, 404, "image.job", f"job {theirs} not found"),  # the same answer: nothing leaks
            ({"job": busy}, 409, "image.job", "it is started"),
            ({"job": waiting}, 409, "image.job", "it is queued"),
            ({"job": training}, 409, "image.job", "is a finetune job, not a generation"),
            ({"job": mine, "index": 1}, 422, "image.index", f"job {mine} has 1 image(s); there is no image 1"),
        ]
        for reference, status, field, words in cases:
            before = (queued(conn), uploads(service_env))
            response = http.post("/generate", json={**DRAFT, "image": reference})
            assert response.status_code == status, (reference, response.text)
            assert response.json()["field"] == field and words in response.json()["detail"], (reference, response.json())
            assert (queued(conn), uploads(service_env)) == before

            # Refine answers alike (the job is the path; the index its own field).
            refine = {"preset": "1k", "index": reference.get("index", 0)}
            response = http.post(f"/jobs/{reference['job']}/refine", json=refine)
            assert response.status_code == status, (reference, response.text)
            assert words in response.json()["detail"], (reference, response.json())
            assert response.json().get("field") == ("index" if field == "image.index" else None)
            assert (queued(conn), uploads(service_env)) == before
        # Only the caller's own jobs: the owner of the other job may use it.
        assert other.post(f"/jobs/{theirs}/refine", json={"width": 64, "height": 64, "strength": 0.05}).status_code == 202
    finally:
        http.delete(f"/jobs/{busy}")
        http.delete(f"/jobs/{waiting}")


def test_an_input_gone_before_its_job_runs_fails_the_job_with_the_reason(
    http: Any, worker: Any, conn: Any, service_env: dict[str, str],
) -> None:
    storage = Path(service_env["URAE_STORAGE_DIR"])
    draft = finished(http, DRAFT)
    busy = http.post("/generate", json=LONG).json()["id"]
    started(http, busy)
    from_job = http.post("/generate", json={**DRAFT, "image": {"job": draft["id"]}}).json()["id"]
    from_upload = http.post("/generate", json={**DRAFT, "image": data_url(source_png())}).json()["id"]
    (storage / draft["result"]["images"][0]["key"]).unlink()
    (storage / json.loads(conn.hget(job_key(from_upload), "payload"))["image"]["key"]).unlink()
    http.delete(f"/jobs/{busy}")
    for job_id, words in ((from_job, f"image: image 0 of job {draft['id']} is no longer stored"),
                          (from_upload, "image: the uploaded input image is no longer stored")):
        job = wait_for_status(http, job_id, timeout_s=120)
        assert job["status"] == "failed" and job["error"] == words, job
    # The worker keeps serving.
    assert finished(http, {**DRAFT, "steps": 1})["status"] == "finished"


def test_a_failed_or_canceled_job_leaves_no_input_behind(
    http: Any, worker: Any, service_env: dict[str, str], lora_path: Path,
) -> None:
    def inputs_of(job_id: str) -> list[str]:
        return [name for name in uploads(service_env) if name.startswith(job_id)]

    doomed = upload_adapter(http, "i2i-doomed", lora_path)
    busy = http.post("/generate", json=LONG).json()["id"]
    started(http, busy)
    # Queued behind it, then its adapter is deleted: it fails when it runs.
    failing = http.post("/generate", json={**DRAFT, "image": data_url(source_png()),
                                           "adapters": [{"name": doomed}]}).json()["id"]
    running = http.post("/generate", json={**LONG, "image": data_url(source_png()), "strength": 1.0}).json()["id"]
    assert inputs_of(failing) and inputs_of(running)
    assert http.delete(f"/adapters/{doomed}").status_code == 204
    http.delete(f"/jobs/{busy}")
    assert wait_for_status(http, failing)["status"] == "failed"
    started(http, running)
    assert inputs_of(running)  # in use while it runs
    http.delete(f"/jobs/{running}")
    assert wait_for_status(http, running)["status"] == "canceled"
    # The worker deletes it right after recording the end.
    deadline = time.monotonic() + 30
    while (inputs_of(failing) or inputs_of(running)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not inputs_of(failing) and not inputs_of(running)


def test_the_worker_decodes_no_bomb(tmp_path: Path) -> None:
    import struct
    import zlib

    from urae.errors import InvalidSpecError
    from worker.jobs import decode_bounded

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    with pytest.raises(InvalidSpecError, match="declares 9000x9000 pixels, more than 67,108,864"):
        decode_bounded(bomb, "the input")
    fine = tmp_path / "fine.png"
    fine.write_bytes(source_png())
    assert decode_bounded(fine, "the input").size == (96, 64)


def test_the_worker_turns_a_photo_upright_by_its_exif_orientation(tmp_path: Path) -> None:
    from worker.jobs import decode_bounded

    photo = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.open(io.BytesIO(source_png(96, 64))).convert("RGB").save(photo, "JPEG", exif=exif)
    assert decode_bounded(photo, "the input").size == (64, 96)


def test_refine_of_a_draft_framed_beyond_4_to_1_is_refused_with_its_reason(http: Any, worker: Any, conn: Any) -> None:
    draft = finished(http, {"prompt": "a long banner", "width": 1024, "height": 64, "steps": 1, "seed": 1})
    before = queued(conn)
    response = http.post(f"/jobs/{draft['id']}/refine", json={"preset": "2k"})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "aspect_ratio" and "beyond 4:1" in response.json()["detail"]
    assert queued(conn) == before
    # An explicit size still refines it.
    job = finished(http, {"width": 2048, "height": 128, "strength": 0.03}, url=f"/jobs/{draft['id']}/refine")
    assert (job["result"]["width"], job["result"]["height"]) == (2048, 128)
