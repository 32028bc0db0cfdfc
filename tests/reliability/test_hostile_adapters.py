"""Hostile adapter uploads against a real worker: each is refused with a 4xx naming the problem,
nothing is registered or left in storage, and the resident model's output does not change."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import wait_for_status
from tests.reliability.conftest import SMALL, files_under


def _safetensors(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    import torch

    from urae.adapters import save_lora
    from urae.adapters.builtin import tiny_lora_layers
    from urae.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("hostile-adapters")
    transformer = build_tiny_pipeline("tiny").transformer
    layers = tiny_lora_layers(transformer, 3)
    good = save_lora(folder / "good.safetensors", layers).read_bytes()

    module, (up, down) = next(iter(layers.items()))
    wrong = dict(layers)
    wrong[module] = (up, torch.cat([down, down], dim=1))
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "good.safetensors")
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, folder / "nan.safetensors")  # written directly: the library refuses to write NaN
    # The same layer names at FLUX.1-dev's width (3072): a file made for the real model.
    other_model = {module: (torch.zeros(3072, 4), torch.zeros(4, 3072))}
    pickled = io.BytesIO()
    torch.save({"lora": up}, pickled)
    entries = {f"junk.{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(60_000)}
    return {
        "truncated": good[: len(good) // 2],
        "pickle": pickled.getvalue(),
        "wrong-shape": save_lora(folder / "wrong.safetensors", wrong).read_bytes(),
        "nan": (folder / "nan.safetensors").read_bytes(),
        "other-model": save_lora(folder / "other.safetensors", other_model).read_bytes(),
        "huge-header-length": struct.pack("<Q", 1 << 62) + b"{}",
        "huge-header": _safetensors(entries, b""),
        "sdxl-keys": _safetensors({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight":
                                   {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, b"\x00" * 64),
        "empty": b"",
    }


HOSTILE = [
    ("truncated", "outside the file"),
    ("pickle", "pickle"),
    ("wrong-shape", "does not fit this base model"),
    ("nan", "nan or infinity"),
    ("other-model", "does not fit this base model"),
    ("huge-header-length", "header length"),
    ("huge-header", "an adapter has at most"),
    ("sdxl-keys", "not lora or urae keys"),
    ("empty", "shorter than"),
]


@pytest.fixture(scope="module")
def worker(start_worker: Any) -> Any:
    return start_worker("gen-hostile", "--queues", "generate")


def pixels(http: Any, body: dict[str, Any]) -> np.ndarray:
    job = wait_for_status(http, http.post("/generate", json=body).json()["id"])
    assert job["status"] == "finished", job["error"]
    content = http.get(f"/jobs/{job['id']}/images/0").content
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


def test_hostile_adapter_uploads_change_nothing(
    http: Any, worker: Any, hostile_files: dict[str, bytes], service_env: dict[str, str]
) -> None:
    storage = Path(service_env["URAE_STORAGE_DIR"])
    before_image = pixels(http, SMALL)
    before_adapters = http.get("/adapters").json()
    before_files = {f for f in files_under(storage) if not f.startswith("jobs/")}

    for case, words in HOSTILE:
        response = http.post("/adapters", files={"file": (f"{case}.safetensors", hostile_files[case])},
                             data={"name": f"hostile-{case}"})
        assert 400 <= response.status_code < 500, (case, response.text)
        assert response.status_code != 401
        assert words in response.json()["detail"].lower(), (case, response.json()["detail"])
        assert str(storage) not in response.json()["detail"]  # no server paths in answers
        assert http.get(f"/adapters/hostile-{case}").status_code == 404

    assert http.get("/adapters").json() == before_adapters
    assert {f for f in files_under(storage) if not f.startswith("jobs/")} == before_files
    # Same worker process and request: any change to the resident model shows, bitwise.
    assert np.array_equal(pixels(http, SMALL), before_image)
    assert worker.proc.poll() is None
