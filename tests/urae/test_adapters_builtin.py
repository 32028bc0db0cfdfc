"""Built-in adapters: tiny stand-ins generated offline and the same in every process; hub names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file

from urae.adapters import (
    BUILTIN_ADAPTERS,
    AdapterFormat,
    inspect_adapter,
    load_adapter_layers,
    resolve_adapter,
)
from urae.adapters.builtin import HUB_FILENAMES, URAE_HUB_REPO
from urae.adapters.minor_components import linear_weight
from urae.errors import AdapterDownloadError, AdapterNotFoundError, NotSafetensorsError
from urae.tiny import build_tiny_pipeline

REPO_ROOT = Path(__file__).resolve().parents[2]

BUILD_SCRIPT = """
import sys
from pathlib import Path
from urae.adapters import resolve_adapter
for name in ("urae-2k", "urae-4k"):
    print(name, resolve_adapter(name, "tiny", Path(sys.argv[1])))
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-adapters")


def test_tiny_builtins_are_urae_shaped_and_fit(cache: Path) -> None:
    transformer = build_tiny_pipeline("tiny").transformer
    info_2k = inspect_adapter(resolve_adapter("urae-2k", "tiny", cache), transformer)
    assert info_2k.format is AdapterFormat.LORA and info_2k.rank == 16 and info_2k.fits_base
    # URAE's 2K layout: to_q/k/v/to_out.0 of the double blocks, to_q/k/v of the single blocks.
    assert len(info_2k.targets) == 2 * 4 + 2 * 3
    info_4k = inspect_adapter(resolve_adapter("urae-4k", "tiny", cache), transformer)
    assert info_4k.format is AdapterFormat.LORA and info_4k.rank == 48 and info_4k.fits_base
    assert info_4k.metadata["urae_source_format"] == "minor_components"
    assert info_4k.metadata["urae_base_lora_sha256"] == info_2k.sha256
    schnell = build_tiny_pipeline("tiny-schnell").transformer
    info_schnell = inspect_adapter(resolve_adapter("urae-4k-schnell", "tiny-schnell", cache), schnell)
    assert info_schnell.rank == 48 and info_schnell.fits_base


def test_tiny_2k_lora_has_a_realistic_magnitude(cache: Path) -> None:
    transformer = build_tiny_pipeline("tiny").transformer
    _, layers = load_adapter_layers(resolve_adapter("urae-2k", "tiny", cache))
    for module, (up, down) in layers.items():
        relative = ((up @ down).norm() / linear_weight(transformer, module).norm()).item()
        assert 0.01 < relative < 0.1, module


def test_tiny_builtins_are_cached(cache: Path) -> None:
    path = resolve_adapter("urae-4k", "tiny", cache)
    stamp = path.stat().st_mtime_ns
    assert resolve_adapter("urae-4k", "tiny", cache) == path
    assert path.stat().st_mtime_ns == stamp
    assert not list(path.parent.glob("*.tmp"))


def test_tiny_builtins_are_the_same_in_every_process(cache: Path, tmp_path: Path) -> None:
    # The stand-ins are computed (seeded randn, SVD): other processes may pick other CPU kernels, so
    # they agree to a tight tolerance, with the same tensors, shapes and metadata.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD_SCRIPT, str(tmp_path / f"p{i}")],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    built = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr
        built.append(dict(line.split(" ", 1) for line in stdout.strip().splitlines()))
    for name in ("urae-2k", "urae-4k"):
        files = [Path(built[0][name]), Path(built[1][name]), resolve_adapter(name, "tiny", cache)]
        loaded = [load_file(f) for f in files]
        for other in loaded[1:]:
            assert other.keys() == loaded[0].keys()
            for key, tensor in loaded[0].items():
                torch.testing.assert_close(other[key], tensor, atol=1e-6, rtol=1e-5)
        metadata = [dict(inspect_adapter(f).metadata) for f in files]
        for meta in metadata:
            meta.pop("urae_base_lora_sha256", None)  # hash of the 2K file's bytes
        assert metadata[0] == metadata[1] == metadata[2]


def test_paths_and_unknown_names(tmp_path: Path) -> None:
    existing = tmp_path / "mine.safetensors"
    existing.write_bytes(b"")
    assert resolve_adapter(str(existing), "tiny") == existing
    with pytest.raises(AdapterNotFoundError, match="urae-2k, urae-4k, urae-4k-schnell"):
        resolve_adapter("urae-8k", "tiny")
    with pytest.raises(AdapterNotFoundError, match="no such adapter file"):
        resolve_adapter(str(tmp_path / "missing.safetensors"), "tiny")
    pickled = tmp_path / "model.bin"
    torch.save({"x": torch.zeros(1)}, pickled)
    with pytest.raises(NotSafetensorsError):
        resolve_adapter(str(pickled), "tiny")


def test_real_model_ids_use_the_hub_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No network here: offline mode answers from a hub cache laid out as huggingface_hub writes it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(AdapterDownloadError, match=HUB_FILENAMES["urae-4k"]):
        resolve_adapter("urae-4k", "black-forest-labs/FLUX.1-dev", tmp_path)
    revision = "0" * 40
    repo = tmp_path / f"models--{URAE_HUB_REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in BUILTIN_ADAPTERS:
        (snapshot / HUB_FILENAMES[name]).write_bytes(name.encode())
    for name in BUILTIN_ADAPTERS:
        path = resolve_adapter(name, "black-forest-labs/FLUX.1-schnell", tmp_path)
        assert path.read_bytes() == name.encode()
    assert (
        resolve_adapter("urae-4k-schnell", "x", tmp_path).name
        == "urae_4k_adapter_lora_conversion_schnell.safetensors"
    )
