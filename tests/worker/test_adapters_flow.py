"""Adapter upload -> conversion by the worker -> use by /generate; hot-swap equals a fresh load."""

from __future__ import annotations

import io
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import wait_for_status
from urae.adapters.builtin import TINY_RANK

SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 5}
LONG = {"prompt": "a slow one", "width": 128, "height": 128, "steps": 100, "seed": 2}


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from urae.adapters import save_lora, save_minor_components
    from urae.adapters.builtin import tiny_lora_layers, tiny_minor_component_layers
    from urae.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("adapters")
    transformer = build_tiny_pipeline("tiny").transformer
    files = {
        "a": save_lora(folder / "a.safetensors", tiny_lora_layers(transformer, 11)),
        "b": save_lora(folder / "b.safetensors", tiny_lora_layers(transformer, 22)),
    }
    fused = tiny_lora_layers(transformer, 33)
    files["base"] = save_lora(folder / "base.safetensors", fused)
    files["minor"] = save_minor_components(folder / "minor.safetensors",
                                           tiny_minor_component_layers(transformer, 44, fused))
    wrong = tiny_lora_layers(transformer, 55)
    module = next(iter(wrong))
    up, down = wrong[module]
    wrong[module] = (up, torch_cat(down))
    files["wrong-shape"] = save_lora(folder / "wrong.safetensors", wrong)
    pickle_like = folder / "model.safetensors"
    pickle_like.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    files["pickle"] = pickle_like
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    files["truncated"] = truncated
    return files


def torch_cat(down: Any) -> Any:
    import torch

    return torch.cat([down, down], dim=1)  # the input width no longer fits the layer


@pytest.fixture(scope="module")
def worker(start_worker: Any) -> Any:
    # Capacity 1: every change of adapter replaces the resident one in place (a hot-swap).
    return start_worker("gen-adapters", "--queues", "generate", env={"URAE_ADAPTER_CAPACITY": "1"})


def upload(http: Any, name: str, path: Path, **form: str) -> Any:
    with open(path, "rb") as f:
        return http.post("/adapters", files={"file": (path.name, f, "application/octet-stream")},
                         data={"name": name, **form})


def generate_pixels(http: Any, body: dict[str, Any]) -> np.ndarray:
    job = wait_for_status(http, http.post("/generate", json=body).json()["id"])
    assert job["status"] == "finished", job["error"]
    content = http.get(f"/jobs/{job['id']}/images/0").content
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"), dtype=np.int16)


def test_uploaded_adapter_is_listed_and_changes_the_output(http: Any, worker: Any, adapter_files: dict[str, Path]) -> None:
    response = upload(http, "style-a", adapter_files["a"], description="stripes")
    assert response.status_code == 201, response.text
    adapter = response.json()
    assert adapter["name"] == "style-a" and adapter["rank"] >= 1 and adapter["description"] == "stripes"
    names = [a["name"] for a in http.get("/adapters").json()["adapters"]]
    assert {"urae-2k", "urae-4k", "style-a"} <= set(names)
    assert http.get("/adapters/style-a").json()["version"] == adapter["version"]

    base = generate_pixels(http, SMALL)
    styled = generate_pixels(http, {**SMALL, "adapters": [{"name": "style-a", "weight": 1.0}]})
    assert np.abs(base - styled).max() > 0
    unweighted = generate_pixels(http, {**SMALL, "adapters": [{"name": "style-a", "weight": 0.0}]})
    assert np.abs(base - unweighted).max() <= 1


def test_built_in_adapters_answer_their_version_ranks_and_size(http: Any, worker: Any, service_env: dict[str, str]) -> None:
    """The files the workers serve for the model (tiny: generated stand-ins), described like registered ones."""
    from urae.adapters import inspect_adapter
    from urae.adapters.builtin import tiny_adapter_path

    listed = {a["name"]: a for a in http.get("/adapters").json()["adapters"] if a["builtin"]}
    expected_ranks = {"urae-2k": (TINY_RANK, TINY_RANK), "urae-4k": (TINY_RANK, 3 * TINY_RANK),
                      "urae-4k-schnell": (TINY_RANK, 3 * TINY_RANK)}
    for name, (rank, export_rank) in expected_ranks.items():
        detail = http.get(f"/adapters/{name}").json()
        assert detail == listed[name]
        path = tiny_adapter_path(name, "tiny", Path(service_env["URAE_ADAPTER_CACHE_DIR"]))
        assert (detail["rank"], detail["export_rank"]) == (rank, export_rank), detail
        assert detail["size_bytes"] == path.stat().st_size
        assert detail["version"] == inspect_adapter(path).sha256[:12]


def test_hot_swap_between_two_adapters_equals_a_fresh_load(http: Any, worker: Any, adapter_files: dict[str, Path]) -> None:
    assert upload(http, "style-b", adapter_files["b"]).status_code == 201
    body_a = {**SMALL, "adapters": [{"name": "style-a"}]}
    body_b = {**SMALL, "adapters": [{"name": "style-b"}]}
    first_a = generate_pixels(http, body_a)
    swapped_b = generate_pixels(http, body_b)
    swapped_a = generate_pixels(http, body_a)
    assert np.abs(first_a - swapped_b).max() > 0
    # Same worker process, same weights copied back into the same slot: bitwise by construction.
    assert np.array_equal(first_a, swapped_a)

    from urae.generate import Generator
    from urae.presets import resolve_spec
    from urae.spec import AdapterRef

    fresh = Generator.load("tiny", device="cpu", dtype="float32", hotswap_rank=64,
                           adapter_resolver=lambda name: adapter_files["b"])
    spec = resolve_spec(SMALL["prompt"], "1k", schnell=fresh.schnell, adapters=(AdapterRef("b", 1.0),),
                        width=64, height=64, steps=2, seed=5)
    reference = np.asarray(fresh.generate(spec).images[0].convert("RGB"), dtype=np.int16)
    assert np.abs(reference - swapped_b).max() <= 1

    # The worker's cache counters reach /metrics with its next heartbeat: wait for it.
    deadline, misses = time.monotonic() + 20, 0
    while time.monotonic() < deadline:
        text = http.get("/metrics").text
        line = next(ln for ln in text.splitlines() if ln.startswith("urae_adapter_cache_misses_total"))
        misses = int(float(line.split()[-1]))
        if misses >= 3:
            break
        time.sleep(0.2)
    assert misses >= 3


def test_minor_component_upload_is_converted_on_top_of_its_base(
    http: Any, worker: Any, adapter_files: dict[str, Path]
) -> None:
    assert upload(http, "fused-base", adapter_files["base"]).status_code == 201
    response = upload(http, "minor-4k", adapter_files["minor"], base_adapter="fused-base")
    assert response.status_code == 201, response.text
    # The rank it was trained at, and the rank it is served at: [B | -B0 | B_base].
    assert (response.json()["rank"], response.json()["export_rank"]) == (TINY_RANK, 3 * TINY_RANK)
    assert generate_pixels(http, {**SMALL, "adapters": [{"name": "minor-4k"}]}).shape == (64, 64, 3)
    # Said to be split from the plain base, the same file converts without the base's LoRA.
    response = upload(http, "minor-plain", adapter_files["minor"], base_adapter="none")
    assert response.status_code == 201, response.text
    assert (response.json()["rank"], response.json()["export_rank"]) == (TINY_RANK, 2 * TINY_RANK)


@pytest.mark.parametrize(
    ("name", "file", "form", "words"),
    [
        ("minor-nobase", "minor", {}, "send base_adapter"),
        ("minor-unknown", "minor", {"base_adapter": "no-such-adapter"}, "does not exist"),
        ("plain-withbase", "a", {"base_adapter": "urae-2k"}, "plain lora"),
        ("none", "a", {}, "reserved"),
    ],
)
def test_minor_component_uploads_must_name_their_base(
    http: Any, adapter_files: dict[str, Path], name: str, file: str, form: dict[str, str], words: str
) -> None:
    """Refused by the API from the file's header, before any worker sees it."""
    response = upload(http, name, adapter_files[file], **form)
    assert response.status_code == 422, response.text
    body = response.json()
    assert words in body["detail"].lower()
    assert body["field"] == ("name" if name == "none" else "base_adapter")
    assert name not in [a["name"] for a in http.get("/adapters").json()["adapters"]]


@pytest.mark.parametrize(
    ("name", "file", "status", "words"),
    [
        ("bad-pickle", "pickle", 422, "pickle"),
        ("bad-truncated", "truncated", 422, "header length"),
        ("bad-shape", "wrong-shape", 422, "does not fit this base model"),
        ("../escape", "a", 422, "name"),
        ("urae-2k", "a", 409, "built-in"),
    ],
)
def test_bad_uploads_are_refused_with_a_reason(
    http: Any, worker: Any, adapter_files: dict[str, Path], name: str, file: str, status: int, words: str
) -> None:
    response = upload(http, name, adapter_files[file])
    assert response.status_code == status, response.text
    body = response.json()
    assert words in (body["detail"] + str(body.get("field"))).lower()
    assert name not in [a["name"] for a in http.get("/adapters").json()["adapters"]] or name == "urae-2k"


def test_delete_adapter_fails_queued_jobs_that_use_it(http: Any, worker: Any, adapter_files: dict[str, Path]) -> None:
    assert upload(http, "short-lived", adapter_files["b"]).status_code == 201
    blocker = http.post("/generate", json=LONG).json()["id"]
    wait_for_status(http, blocker, ("started",))
    queued = http.post("/generate", json={**SMALL, "adapters": [{"name": "short-lived"}]}).json()["id"]
    assert http.delete("/adapters/short-lived").status_code == 204
    assert http.get("/adapters/short-lived").status_code == 404
    refused = http.post("/generate", json={**SMALL, "adapters": [{"name": "short-lived"}]})
    assert refused.status_code == 422 and refused.json()["field"] == "adapters[0].name"
    http.delete(f"/jobs/{blocker}")
    job = wait_for_status(http, queued)
    assert job["status"] == "failed"
    assert "short-lived" in job["error"] and "deleted" in job["error"]
    assert http.delete("/adapters/urae-2k").status_code == 409


def test_a_queued_job_fails_rather_than_use_a_replaced_adapter(
    http: Any, worker: Any, adapter_files: dict[str, Path]
) -> None:
    assert upload(http, "versioned", adapter_files["a"]).status_code == 201
    blocker = http.post("/generate", json=LONG).json()["id"]
    wait_for_status(http, blocker, ("started",))
    queued = http.post("/generate", json={**SMALL, "adapters": [{"name": "versioned"}]}).json()["id"]
    # The replacement is converted first (its import job has the higher priority).
    assert upload(http, "versioned", adapter_files["b"], replace="true").status_code in (201, 202)
    http.delete(f"/jobs/{blocker}")
    job = wait_for_status(http, queued)
    assert job["status"] == "failed"
    assert "adapter 'versioned' changed since the job was submitted" in job["error"]
    # A job submitted now uses the new version.
    assert generate_pixels(http, {**SMALL, "adapters": [{"name": "versioned"}]}).shape == (64, 64, 3)


def test_a_failing_jobs_error_names_no_server_path(
    http: Any, worker: Any, adapter_files: dict[str, Path], service_env: dict[str, str]
) -> None:
    assert upload(http, "lost-file", adapter_files["a"]).status_code == 201
    stored = Path(service_env["URAE_STORAGE_DIR"]) / "adapters" / "lost-file"
    for path in Path(service_env["URAE_STORAGE_DIR"]).glob("adapters/lost-file/*"):
        # The object was truncated behind the registry's back: the library's error names the file
        # by its full path ("<path>: file is 0 bytes, ...").
        path.write_bytes(b"")
    job = wait_for_status(http, http.post("/generate", json={**SMALL, "adapters": [{"name": "lost-file"}]}).json()["id"])
    assert job["status"] == "failed"
    assert job["error"] and service_env["URAE_STORAGE_DIR"] not in job["error"]
    assert "/adapters/" not in job["error"] and str(stored) not in job["error"]
    assert "too short to hold a safetensors header" in job["error"]


def test_a_name_taken_while_an_import_waited_is_not_overwritten(
    http: Any, worker: Any, adapter_files: dict[str, Path], settings: Any, redis_url: str
) -> None:
    import redis

    from jobstore.adapters import get_adapter, register_adapter
    from jobstore.contract import ADAPTER_IMPORT_QUEUE, AdapterImportPayload, JobKind, upload_object
    from jobstore.jobs import JobRecords, new_job_id
    from jobstore.settings import hash_api_key
    from service.auth import key_id_of
    from tests.conftest import API_KEY

    conn = redis.Redis.from_url(redis_url)
    storage = Path(settings.storage_dir)
    # Accepted while the name was free (replaces=""), but another key registered it before the
    # worker got to the job (as a long fine-tune or a slow import would allow).
    job_id = new_job_id()
    upload_key = upload_object(job_id, ".safetensors")
    (storage / upload_key).parent.mkdir(parents=True, exist_ok=True)
    (storage / upload_key).write_bytes(adapter_files["a"].read_bytes())
    theirs = {"name": "contested", "version": "theirs1", "object": "adapters/contested/theirs1.safetensors",
              "rank": 4, "size_bytes": 1, "source": "upload", "owner": "someone-else"}
    register_adapter(conn, theirs)
    payload = AdapterImportPayload(job_id=job_id, name="contested", upload=upload_key, replaces="")
    JobRecords(conn).create_and_enqueue(job_id, JobKind.ADAPTER_IMPORT, ADAPTER_IMPORT_QUEUE, payload.model_dump(),
                                        owner=key_id_of(hash_api_key(API_KEY)))
    job = wait_for_status(http, job_id)
    assert job["status"] == "failed"
    assert "adapter 'contested' was registered or replaced by another upload" in job["error"]
    assert get_adapter(conn, "contested") == theirs
    assert list(storage.glob("adapters/contested/*")) == []  # the converted file was not kept
    assert not (storage / upload_key).exists()


def test_a_jobs_images_count_against_its_keys_storage_until_retention_deletes_them(
    http: Any, worker: Any, settings: Any, redis_url: str
) -> None:
    import redis

    from jobstore.contract import job_key
    from jobstore.retention import sweep_expired_outputs
    from jobstore.settings import hash_api_key
    from jobstore.storage import LocalStorage
    from jobstore.usage import usage
    from service.auth import key_id_of
    from tests.conftest import API_KEY

    conn = redis.Redis.from_url(redis_url)
    key_id = key_id_of(hash_api_key(API_KEY))
    before = usage(conn, key_id)
    job = wait_for_status(http, http.post("/generate", json={**SMALL, "num_images": 2}).json()["id"])
    assert job["status"] == "finished", job["error"]
    stored = sum(p.stat().st_size for p in (Path(settings.storage_dir) / "jobs" / job["id"]).iterdir())
    assert stored > 0 and usage(conn, key_id) == before + stored
    conn.delete(job_key(job["id"]))  # the record expired
    assert job["id"] in sweep_expired_outputs(conn, LocalStorage(settings.storage_dir), 0)
    assert usage(conn, key_id) == before
