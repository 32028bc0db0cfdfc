"""Adapter files: round trips, key variants, and every validation error (each names the file)."""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from urae.adapters import (
    AdapterFormat,
    inspect_adapter,
    load_adapter_layers,
    load_lora_state_dict,
    read_header,
    save_lora,
    save_minor_components,
)
from urae.adapters.formats import MAX_HEADER_BYTES
from urae.errors import (
    AdapterError,
    AdapterFormatError,
    AdapterNotFoundError,
    BaseModelMismatchError,
    HeaderFormatError,
    HeaderSizeError,
    NonFiniteWeightsError,
    NotSafetensorsError,
    RankMismatchError,
    TensorDtypeError,
    TensorShapeError,
    TruncatedAdapterError,
    UnknownKeysError,
)
from urae.tiny import build_tiny_pipeline

WIDTH = 32  # the tiny transformer's inner dimension


@pytest.fixture(scope="module")
def transformer() -> Any:
    return build_tiny_pipeline("tiny").transformer


def random_layers(rank: int = 4, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    modules = [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.1.attn.to_out.0",
        "single_transformer_blocks.1.attn.to_v",
    ]
    return {
        m: (torch.randn(WIDTH, rank, generator=g), torch.randn(rank, WIDTH, generator=g)) for m in modules
    }


def write_raw(path: Path, header: dict[str, Any], data: bytes, length: int | None = None) -> Path:
    """A safetensors-like file with exactly these bytes (to build broken files)."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def good_lora_file(path: Path) -> Path:
    return save_lora(path, random_layers())


def test_save_and_load_round_trip_in_diffusers_form(tmp_path: Path, transformer: Any) -> None:
    layers = random_layers(rank=4)
    path = save_lora(tmp_path / "a.safetensors", layers, metadata={"note": "hello"})
    state = load_lora_state_dict(path, transformer)
    assert sorted(state) == sorted(f"transformer.{m}.lora_{p}.weight" for m in layers for p in ("A", "B"))
    for module, (up, down) in layers.items():
        assert torch.equal(state[f"transformer.{module}.lora_B.weight"], up)
        assert torch.equal(state[f"transformer.{module}.lora_A.weight"], down)
    info = inspect_adapter(path, transformer)
    assert info.format is AdapterFormat.LORA
    assert info.rank == 4
    assert info.targets == sorted(layers)
    assert info.num_parameters == 3 * 2 * 4 * WIDTH
    assert info.fits_base is True and info.problems == []
    assert info.metadata["note"] == "hello"
    assert len(info.sha256) == 64
    assert read_header(path)["__metadata__"]["note"] == "hello"


@pytest.mark.parametrize("prefix", ["", "transformer.", "base_model.model.", "base_model.model.transformer."])
def test_key_variants_normalise_to_the_same_state_dict(tmp_path: Path, transformer: Any, prefix: str) -> None:
    layers = random_layers()
    tensors = {}
    for module, (up, down) in layers.items():
        tensors[f"{prefix}{module}.lora_A.weight"] = down
        tensors[f"{prefix}{module}.lora_B.weight"] = up
    save_file(tensors, tmp_path / "v.safetensors")
    expected = load_lora_state_dict(save_lora(tmp_path / "ref.safetensors", layers))
    state = load_lora_state_dict(tmp_path / "v.safetensors", transformer)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_other_flux_modules_are_accepted(tmp_path: Path, transformer: Any) -> None:
    g = torch.Generator().manual_seed(3)
    layers = {
        "transformer_blocks.0.ff.net.0.proj": (
            torch.randn(128, 2, generator=g),
            torch.randn(2, WIDTH, generator=g),
        ),
        "single_transformer_blocks.0.proj_out": (
            torch.randn(WIDTH, 2, generator=g),
            torch.randn(2, 160, generator=g),
        ),
        "x_embedder": (torch.randn(WIDTH, 2, generator=g), torch.randn(2, 16, generator=g)),
    }
    info = inspect_adapter(save_lora(tmp_path / "ff.safetensors", layers), transformer)
    assert info.fits_base is True
    assert info.targets == sorted(layers)


def test_alpha_is_folded_into_b(tmp_path: Path) -> None:
    up, down = torch.randn(WIDTH, 8), torch.randn(8, WIDTH)
    module = "transformer_blocks.0.attn.to_k"
    save_file(
        {
            f"{module}.lora_A.weight": down,
            f"{module}.lora_B.weight": up,
            f"{module}.alpha": torch.tensor(4.0),
        },
        tmp_path / "alpha.safetensors",
    )
    state = load_lora_state_dict(tmp_path / "alpha.safetensors")
    torch.testing.assert_close(state[f"transformer.{module}.lora_B.weight"], up * 0.5)
    # save_lora's alpha argument gives the same effective delta with scale 1 in the file.
    path = save_lora(tmp_path / "saved.safetensors", {module: (up, down)}, alpha={module: 4.0})
    torch.testing.assert_close(load_lora_state_dict(path)[f"transformer.{module}.lora_B.weight"], up * 0.5)


def test_peft_metadata_alpha_is_honoured(tmp_path: Path) -> None:
    up, down = torch.randn(WIDTH, 8), torch.randn(8, WIDTH)
    module = "transformer_blocks.0.attn.to_q"
    config = {"transformer.r": 8, "transformer.lora_alpha": 16}
    save_file(
        {f"transformer.{module}.lora_A.weight": down, f"transformer.{module}.lora_B.weight": up},
        tmp_path / "peft.safetensors",
        metadata={"lora_adapter_metadata": json.dumps(config)},
    )
    state = load_lora_state_dict(tmp_path / "peft.safetensors")
    torch.testing.assert_close(state[f"transformer.{module}.lora_B.weight"], up * 2.0)


def test_minor_component_file_is_recognised(tmp_path: Path, transformer: Any) -> None:
    layers = random_layers(rank=4)
    path = save_minor_components(tmp_path / "m.safetensors", layers)
    keys = set(read_header(path)) - {"__metadata__"}
    assert "transformer_blocks.1.attn.processor.to_out_a.weight" in keys
    assert "single_transformer_blocks.1.attn.processor.to_v_b.weight" in keys
    info = inspect_adapter(path, transformer)
    assert info.format is AdapterFormat.MINOR_COMPONENTS and info.rank == 4 and info.fits_base
    adapter_format, loaded = load_adapter_layers(path, transformer)
    assert adapter_format is AdapterFormat.MINOR_COMPONENTS
    for module, (b, a) in layers.items():
        assert torch.equal(loaded[module][0], b) and torch.equal(loaded[module][1], a)
    with pytest.raises(AdapterFormatError, match="convert"):
        load_lora_state_dict(path)


# --- validation: each broken file raises its own error class, naming the file -----------------------


def _pickle_bin(path: Path) -> Path:
    p = path.with_suffix(".bin")
    torch.save(random_layers(), p)
    return p


class _Bomb:
    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.system, (f"touch {_Bomb.marker}",))

    marker = ""


def _pickle_named_safetensors(path: Path) -> Path:
    _Bomb.marker = str(path.with_name("unpickled"))
    path.write_bytes(pickle.dumps(_Bomb()))
    return path


def _torch_zip_named_safetensors(path: Path) -> Path:
    torch.save({"x": torch.zeros(2)}, path)
    return path


def _tiny_file(path: Path) -> Path:
    path.write_bytes(b"\x01\x00")
    return path


def _truncated(path: Path) -> Path:
    good = good_lora_file(path.with_name("good.safetensors")).read_bytes()
    path.write_bytes(good[:-10])
    return path


def _absurd_header(path: Path) -> Path:
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    return path


def _oversized_header(path: Path) -> Path:
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}" * 8)
    return path


def _header_beyond_file(path: Path) -> Path:
    return write_raw(path, {}, b"", length=1000)


def _not_json(path: Path) -> Path:
    raw = b"{not json at all"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def _unknown_key(path: Path) -> Path:
    save_file({"unet.down_blocks.0.lora_A.weight": torch.zeros(2, 4)}, path)
    return path


def _float64(path: Path) -> Path:
    m = "transformer_blocks.0.attn.to_q"
    save_file(
        {
            f"{m}.lora_A.weight": torch.zeros(2, WIDTH, dtype=torch.float64),
            f"{m}.lora_B.weight": torch.zeros(WIDTH, 2),
        },
        path,
    )
    return path


def _int_tensor(path: Path) -> Path:
    m = "transformer_blocks.0.attn.to_q"
    save_file(
        {
            f"{m}.lora_A.weight": torch.zeros(2, WIDTH, dtype=torch.int32),
            f"{m}.lora_B.weight": torch.zeros(WIDTH, 2),
        },
        path,
    )
    return path


def _three_dims(path: Path) -> Path:
    m = "transformer_blocks.0.attn.to_q"
    save_file(
        {f"{m}.lora_A.weight": torch.zeros(2, WIDTH, 1), f"{m}.lora_B.weight": torch.zeros(WIDTH, 2)}, path
    )
    return path


def _shape_vs_bytes(path: Path) -> Path:
    m = "transformer_blocks.0.attn.to_q"
    header = {
        f"{m}.lora_A.weight": {"dtype": "F32", "shape": [2, WIDTH], "data_offsets": [0, 8]},
        f"{m}.lora_B.weight": {"dtype": "F32", "shape": [WIDTH, 2], "data_offsets": [8, 16]},
    }
    return write_raw(path, header, bytes(16))


def _rank_mismatch(path: Path) -> Path:
    m = "transformer_blocks.0.attn.to_q"
    save_file(
        {f"{m}.lora_A.weight": torch.zeros(4, WIDTH), f"{m}.lora_B.weight": torch.zeros(WIDTH, 2)}, path
    )
    return path


def _missing_b(path: Path) -> Path:
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, WIDTH)}, path)
    return path


def _nan(path: Path) -> Path:
    layers = random_layers()
    layers["transformer_blocks.0.attn.to_q"][0][0, 0] = float("nan")
    save_file(
        {f"{m}.lora_{p}.weight": t for m, (b, a) in layers.items() for p, t in (("A", a), ("B", b))}, path
    )
    return path


def _other_base_model(path: Path) -> Path:
    # FLUX-sized (3072) matrices do not fit the 32-wide tiny transformer.
    m = "transformer_blocks.0.attn.to_q"
    save_file({f"{m}.lora_A.weight": torch.zeros(2, 3072), f"{m}.lora_B.weight": torch.zeros(3072, 2)}, path)
    return path


def _block_not_in_model(path: Path) -> Path:
    m = "transformer_blocks.18.attn.to_q"
    save_file(
        {f"{m}.lora_A.weight": torch.zeros(2, WIDTH), f"{m}.lora_B.weight": torch.zeros(WIDTH, 2)}, path
    )
    return path


def _empty(path: Path) -> Path:
    save_file({}, path)
    return path


BROKEN_FILES: list[tuple[Callable[[Path], Path], type[AdapterError], str]] = [
    (_pickle_bin, NotSafetensorsError, "pickle"),
    (_pickle_named_safetensors, NotSafetensorsError, "pickle"),
    (_torch_zip_named_safetensors, NotSafetensorsError, "pickle"),
    (_tiny_file, TruncatedAdapterError, "too short"),
    (_truncated, TruncatedAdapterError, "truncated"),
    (_absurd_header, HeaderSizeError, "absurd"),
    (_oversized_header, HeaderSizeError, "absurd"),
    (_header_beyond_file, HeaderSizeError, "beyond the end"),
    (_not_json, HeaderFormatError, "JSON"),
    (_unknown_key, UnknownKeysError, "unet.down_blocks.0.lora_A.weight"),
    (_float64, TensorDtypeError, "F64"),
    (_int_tensor, TensorDtypeError, "I32"),
    (_three_dims, TensorShapeError, "matrices"),
    (_shape_vs_bytes, TensorShapeError, "needs 256 bytes"),
    (_rank_mismatch, RankMismatchError, "rank 4 but B has rank 2"),
    (_missing_b, RankMismatchError, "no B"),
    (_nan, NonFiniteWeightsError, "NaN"),
    (_other_base_model, BaseModelMismatchError, "3072 x 3072"),
    (_block_not_in_model, BaseModelMismatchError, "transformer_blocks.18.attn.to_q does not exist"),
    (_empty, AdapterFormatError, "no adapter tensors"),
]


@pytest.mark.parametrize(
    ("make", "error", "fragment"), BROKEN_FILES, ids=[m.__name__.strip("_") for m, _, _ in BROKEN_FILES]
)
def test_broken_file_raises_specific_error_naming_the_file(
    tmp_path: Path, transformer: Any, make: Callable[[Path], Path], error: type[AdapterError], fragment: str
) -> None:
    path = make(tmp_path / "broken.safetensors")
    with pytest.raises(error) as caught:
        load_lora_state_dict(path, transformer)
    message = str(caught.value)
    assert str(path) in message
    assert fragment in message
    assert "\n" not in message
    assert not (tmp_path / "unpickled").exists(), "the file was unpickled"


def test_inspect_reports_fit_problems_instead_of_raising(tmp_path: Path, transformer: Any) -> None:
    info = inspect_adapter(_other_base_model(tmp_path / "big.safetensors"), transformer)
    assert info.fits_base is False
    assert "3072 x 3072" in info.problems[0]
    assert inspect_adapter(tmp_path / "big.safetensors").fits_base is None


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFoundError, match="no such file"):
        read_header(tmp_path / "nope.safetensors")


def test_failed_save_leaves_nothing_behind(tmp_path: Path) -> None:
    path = good_lora_file(tmp_path / "kept.safetensors")
    before = path.read_bytes()
    layers = random_layers()
    layers["transformer_blocks.0.attn.to_q"][1][0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError):
        save_lora(path, layers)
    with pytest.raises(UnknownKeysError):
        save_lora(path, {"unet.conv_in": (torch.zeros(4, 1), torch.zeros(1, 4))})
    with pytest.raises(RankMismatchError):
        save_lora(path, {"transformer_blocks.0.attn.to_q": (torch.zeros(WIDTH, 2), torch.zeros(3, WIDTH))})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.safetensors"]


def test_header_length_starting_like_a_pickle_is_still_safetensors(tmp_path: Path, transformer: Any) -> None:
    # A length field whose low byte is 0x80 must not be mistaken for pickle's PROTO opcode.
    path = tmp_path / "x80.safetensors"
    for pad in range(300):
        save_lora(path, random_layers(), metadata={"pad": "p" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert inspect_adapter(path, transformer).fits_base is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_written_files_are_standard_safetensors_with_sorted_metadata(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    layers = {m: (up.to(dtype), down.to(dtype)) for m, (up, down) in random_layers().items()}
    path = save_lora(tmp_path / "w.safetensors", layers, metadata={"zeta": "1", "alpha": "2", "mid": "3"})
    loaded = load_file(path)
    for module, (up, down) in layers.items():
        assert loaded[f"transformer.{module}.lora_B.weight"].dtype == dtype
        assert torch.equal(loaded[f"transformer.{module}.lora_B.weight"], up)
        assert torch.equal(loaded[f"transformer.{module}.lora_A.weight"], down)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["zeta"] == "1"
    # Metadata in sorted order: the same content gives the same bytes (and SHA-256) in any process.
    raw_header = path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")]
    assert list(json.loads(raw_header)["__metadata__"]) == sorted(json.loads(raw_header)["__metadata__"])
    again = save_lora(
        tmp_path / "again.safetensors", layers, metadata={"mid": "3", "alpha": "2", "zeta": "1"}
    )
    assert again.read_bytes() == path.read_bytes()
