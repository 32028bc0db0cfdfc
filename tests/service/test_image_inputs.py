"""Image-to-image inputs at the API (real uvicorn, real Redis, no worker): what is refused, with which
status and field, before anything is stored or queued; what is accepted is stored before its job is
queued and belongs to that job."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image

from jobstore.contract import GENERATE_QUEUES, MAX_INPUT_IMAGE_PIXELS, GeneratePayload, job_key
from jobstore.queues import rq_queue_key
from tests.conftest import make_settings

# Small on purpose: the size refusals are reached with small bodies.
MAX_INPUT_BYTES = 64 * 1024
BASE = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def service_env(service_env: dict[str, str]) -> dict[str, str]:
    return {**service_env, "URAE_MAX_INPUT_IMAGE_BYTES": str(MAX_INPUT_BYTES)}


@pytest.fixture(scope="module")
def settings(service_env: dict[str, str]) -> Any:
    return make_settings(service_env)


@pytest.fixture(scope="module")
def conn(service_env: dict[str, str]) -> Any:
    return redis.Redis.from_url(service_env["URAE_REDIS_URL"])


def image_bytes(width: int = 48, height: int = 32, fmt: str = "PNG") -> bytes:
    pixels = np.linspace(0, 255, width * height * 3).reshape(height, width, 3).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with almost no pixel data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def queued(conn: Any) -> int:
    return sum(int(conn.llen(rq_queue_key(q))) for q in GENERATE_QUEUES)


def uploads(service_env: dict[str, str]) -> list[str]:
    folder = Path(service_env["URAE_STORAGE_DIR"]) / "uploads"
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def incompressible_png(min_bytes: int) -> bytes:
    side = int((min_bytes / 3) ** 0.5) + 8
    noise = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG", compress_level=0)
    return buffer.getvalue()


BAD_INPUTS = [
    # (case, body changes, status, field, words of the detail)
    ("not a data URL", {"image": "https://example.com/a.png"}, 422, "image", "must be a data: URL"),
    ("not base64-encoded", {"image": "data:image/png,abc"}, 422, "image", "must be base64-encoded"),
    ("a media type not served", {"image": "data:image/gif;base64,R0lGODlhAQABAAAAACw="}, 422, "image",
     "media type 'image/gif' is not one of image/png, image/jpeg, image/webp"),
    ("not base64", {"image": "data:image/png;base64,!!!notbase64!!!"}, 422, "image", "not valid base64"),
    ("a JPEG declared as PNG", {"image": data_url(image_bytes(fmt="JPEG"))}, 422, "image", "not a PNG image"),
    ("PNG magic, then garbage", {"image": data_url(b"\x89PNG\r\n\x1a\n" + b"\x07" * 64)}, 422, "image",
     "not a readable PNG image"),
    ("a WebP that is not one", {"image": data_url(b"RIFF\0\0\0\0WEBPjunk", "image/webp")}, 422, "image",
     "not a readable WEBP image"),
    ("more pixels than the maximum", {"image": data_url(png_header_only(9000, 9000))}, 422, "image",
     "declares 9000x9000 pixels, more than the maximum of 67,108,864"),
    ("larger than URAE_MAX_INPUT_IMAGE_BYTES", {"image": data_url(incompressible_png(MAX_INPUT_BYTES + 4096))}, 413,
     "image", f"larger than the limit of {MAX_INPUT_BYTES} bytes"),
    ("neither a URL nor a reference", {"image": 7}, 422, "image", 'must be a data: URL or {"job": id, "index": n}'),
    ("a reference with an unknown key", {"image": {"job": "a" * 32, "frame": 1}}, 422, "image", "frame"),
    ("a reference to a malformed id", {"image": {"job": "../x", "index": 0}}, 422, "image", "job"),
    ("strength without an image", {"strength": 0.5}, 422, "strength", "applies to an input image"),
    ("strength 0", {"image": data_url(image_bytes()), "strength": 0}, 422, "strength", "greater than 0"),
    ("strength above 1", {"image": data_url(image_bytes()), "strength": 1.5}, 422, "strength", "less than or equal to 1"),
]


@pytest.mark.parametrize(("case", "changes", "status", "field", "words"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_a_bad_input_is_refused_and_nothing_is_queued_or_stored(
    http: Any, conn: Any, service_env: dict[str, str], case: str, changes: dict[str, Any], status: int, field: str,
    words: str,
) -> None:
    before = (queued(conn), uploads(service_env))
    response = http.post("/generate", json={**BASE, **changes})
    assert response.status_code == status, (case, response.text[:300])
    body = response.json()
    assert body["field"] == field and words in body["detail"], (case, body)
    assert (queued(conn), uploads(service_env)) == before


def test_the_pixel_maximum_is_documented_and_read_from_the_header_only(http: Any) -> None:
    assert MAX_INPUT_IMAGE_PIXELS == 8192 * 8192
    # At the maximum (declared; almost no pixel data behind it) the header passes the size check, so
    # nothing was decoded to refuse the larger one above.
    accepted = http.post("/generate", json={**BASE, "image": data_url(png_header_only(8192, 8192))})
    assert accepted.status_code == 202, accepted.text
    http.delete(f"/jobs/{accepted.json()['id']}")
    refused = http.post("/generate", json={**BASE, "image": data_url(png_header_only(8192, 8193))})
    assert refused.status_code == 422 and refused.json()["field"] == "image"


def test_config_lists_the_input_limits_that_generate_enforces(http: Any) -> None:
    limits = http.get("/config").json()["input_image"]
    assert limits == {"max_bytes": MAX_INPUT_BYTES, "max_pixels": 8192 * 8192,
                      "content_types": ["image/jpeg", "image/png", "image/webp"]}
    # What it lists is what is refused: a byte over the listed size, a type not listed.
    over = http.post("/generate", json={**BASE, "image": data_url(incompressible_png(limits["max_bytes"] + 1))})
    assert over.status_code == 413 and str(limits["max_bytes"]) in over.json()["detail"]
    for media_type in limits["content_types"]:
        fmt = media_type.split("/")[1].upper()
        accepted = http.post("/generate", json={**BASE, "image": data_url(image_bytes(fmt=fmt), media_type)})
        assert accepted.status_code == 202, (media_type, accepted.text)
        http.delete(f"/jobs/{accepted.json()['id']}")
    gif = http.post("/generate", json={**BASE, "image": "data:image/gif;base64,R0lGODlhAQABAAAAACw="})
    assert gif.status_code == 422 and "image/gif" in gif.json()["detail"]


def test_post_generate_has_its_own_body_limit(http: Any, settings: Any, conn: Any, service_env: dict[str, str]) -> None:
    route_limit = -(-MAX_INPUT_BYTES * 4 // 3) + settings.max_json_body_bytes
    # Larger than any other JSON route takes, within this route's limit: read, and its image checked.
    within = {**BASE, "image": data_url(image_bytes()), "note": "x" * (settings.max_json_body_bytes + 1000)}
    response = http.post("/generate", json=within)
    assert response.status_code == 422 and response.json()["field"] == "note", response.text[:300]
    # Past it: 413 while the body arrives, before anything parses it.
    before = (queued(conn), uploads(service_env))
    over = {**BASE, "image": "data:image/png;base64," + "A" * route_limit}
    response = http.post("/generate", json=over)
    assert response.status_code == 413, response.text[:300]
    assert response.json()["field"] == "body" and f"limit of {route_limit} bytes" in response.json()["detail"]
    assert (queued(conn), uploads(service_env)) == before
    # Other routes keep the JSON limit.
    response = http.post(f"/jobs/{'a' * 32}/refine", json={"preset": "2k", "note": "x" * settings.max_json_body_bytes})
    assert response.status_code == 413


def test_an_accepted_input_is_stored_before_its_job_is_queued_and_owned_by_it(
    http: Any, conn: Any, service_env: dict[str, str],
) -> None:
    data = image_bytes(fmt="WEBP")
    response = http.post("/generate", json={**BASE, "image": data_url(data, "image/webp")},
                         headers={"Idempotency-Key": "webp-input-1"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.headers["location"] == f"/jobs/{job_id}"
    payload = GeneratePayload.model_validate_json(conn.hget(job_key(job_id), "payload"))
    assert payload.image is not None and payload.image.key == f"uploads/{job_id}.input.webp"
    assert payload.strength == 0.45  # the default, equal to the library's (tests/jobstore/test_contract_sync.py)
    stored = Path(service_env["URAE_STORAGE_DIR"]) / payload.image.key
    assert stored.read_bytes() == data

    # The same request again: the same job, nothing stored twice. Another image under the key: refused.
    again = http.post("/generate", json={**BASE, "image": data_url(data, "image/webp")},
                      headers={"Idempotency-Key": "webp-input-1"})
    assert again.status_code == 202 and again.json()["id"] == job_id
    assert [u for u in uploads(service_env) if u.startswith(job_id)] == [f"{job_id}.input.webp"]
    other = http.post("/generate", json={**BASE, "image": data_url(image_bytes(40, 40, "WEBP"), "image/webp")},
                      headers={"Idempotency-Key": "webp-input-1"})
    assert other.status_code == 422 and other.json()["field"] == "Idempotency-Key"

    # Canceled before any worker took it: its input goes with it.
    assert http.delete(f"/jobs/{job_id}").status_code == 200
    assert not stored.exists()


def test_an_input_whose_job_cannot_be_queued_is_deleted(client: Any, service_env: dict[str, str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    records = client.app.state.records

    def redis_down(*_: Any, **__: Any) -> Any:
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(records, "create_and_enqueue", redis_down)
    before = uploads(service_env)
    response = client.post("/generate", json={**BASE, "image": data_url(image_bytes())})
    assert response.status_code == 503
    assert uploads(service_env) == before


def test_the_retention_sweep_removes_the_input_of_a_job_whose_worker_died(
    http: Any, conn: Any, client: Any, service_env: dict[str, str],
) -> None:
    from jobstore.retention import sweep_orphaned_uploads

    storage = client.app.state.storage
    records = client.app.state.records
    waiting = http.post("/generate", json={**BASE, "image": data_url(image_bytes())}).json()["id"]
    dead = http.post("/generate", json={**BASE, "image": data_url(image_bytes())}).json()["id"]
    # A worker took the job and died: the reaper fails it, nobody deletes its input.
    assert records.start(dead, "gone-worker") is not None
    assert records.fail(dead, "worker gone-worker stopped responding")
    storage.put(f"uploads/{'f' * 32}.input.png", image_bytes())  # a job whose record is gone

    assert sweep_orphaned_uploads(conn, storage, min_age_s=3600) == []  # too young: its job may be on its way
    removed = sweep_orphaned_uploads(conn, storage, min_age_s=0)
    assert removed == sorted([f"uploads/{dead}.input.png", f"uploads/{'f' * 32}.input.png"])
    assert storage.exists(f"uploads/{waiting}.input.png")  # a queued job keeps its input
    http.delete(f"/jobs/{waiting}")


def test_refine_needs_a_target_size(http: Any) -> None:
    job = "a" * 32
    for body, words in (({}, "give the target size"), ({"preset": "2k", "width": 512, "height": 512}, "one of the two"),
                        ({"preset": "8k"}, "1k"), ({"preset": "2k", "strength": 0}, "greater than 0"),
                        ({"preset": "2k", "index": 4}, "less than 4")):
        response = http.post(f"/jobs/{job}/refine", json=body)
        assert response.status_code == 422 and words in response.json()["detail"], (body, response.text)
    assert http.post(f"/jobs/{job}/refine", json={"preset": "2k"}).status_code == 404


def test_refined_sizes_keep_the_drafts_framing() -> None:
    from service.routers.generate import refined_size

    named = GeneratePayload(job_id="a" * 32, prompt="p", preset="1k", aspect_ratio="16:9", seed=1)
    assert refined_size(named, "4k") == {"preset": "4k", "aspect_ratio": "16:9"}
    explicit = GeneratePayload(job_id="a" * 32, prompt="p", preset="1k", width=128, height=64, seed=1)
    # Its own framing in lowest terms; the worker sizes the preset at the served model's scale.
    assert refined_size(explicit, "2k") == {"preset": "2k", "aspect_ratio": "2:1"}
    odd = GeneratePayload(job_id="a" * 32, prompt="p", preset="1k", width=1504, height=992, seed=1)
    assert refined_size(odd, "4k") == {"preset": "4k", "aspect_ratio": "47:31"}
