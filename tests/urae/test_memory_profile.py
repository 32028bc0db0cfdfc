"""The 24gb memory profile on the CPU: 8-bit transformer weights (int8 weight-only here: fp8 needs a
GPU with compute capability >= 8.9, and its failure falls back to int8), adapters still hot-swapped,
the exact banded decode above 1K, the profile reported in capabilities and image metadata.

How much the profile keeps on a GPU at 2K and 4K is counted on the real architecture in
tests/bench/test_memory_accounting.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from urae.adapters import save_lora
from urae.adapters.builtin import resolve_adapter, tiny_lora_layers
from urae.errors import InvalidSpecError, TierUnavailableError
from urae.generate import Generator
from urae.memory_profile import (
    BANDED_DECODE_ABOVE_PIXELS,
    FLOAT8,
    INT8_WEIGHT_ONLY,
    MemoryPlan,
    move_transformer,
    plan_memory,
    quantize_for_plan,
)
from urae.presets import resolve_spec
from urae.spec import AdapterRef
from urae.tiers import resolve_served_tiers
from urae.tiny import build_tiny_pipeline

torchao = pytest.importorskip("torchao", reason="the 24gb profile quantizes with torchao (urae-serve[gpu]), not installed")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("profile-adapters")
    transformer = build_tiny_pipeline("tiny").transformer
    return {
        "style": save_lora(folder / "style.safetensors", tiny_lora_layers(transformer, seed=21, rank=8)),
        "other": save_lora(folder / "other.safetensors", tiny_lora_layers(transformer, seed=22, rank=8)),
    }


def _load(adapters: dict[str, Path], profile: str) -> Generator:
    def resolver(name: str) -> Path:
        return adapters[name] if name in adapters else resolve_adapter(name, "tiny")

    return Generator.load("tiny", device="cpu", dtype="float32", adapter_resolver=resolver, memory_profile=profile)


@pytest.fixture(scope="module")
def profiled(adapters: dict[str, Path]) -> Generator:
    return _load(adapters, "24gb")


@pytest.fixture(scope="module")
def plain(adapters: dict[str, Path]) -> Generator:
    return _load(adapters, "default")


def _image(generator: Generator, adapters: tuple[AdapterRef, ...] = (), size: int = 128, steps: int = 3) -> np.ndarray:
    spec = resolve_spec("a harbour at night", "2k", width=size, height=size, steps=steps, seed=4, adapters=adapters)
    result = generator.generate(spec)
    return np.asarray(result.images[0]).astype(np.int16)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def test_plans() -> None:
    default, small = plan_memory("default", "cpu"), plan_memory("24gb", "cpu")
    assert default.weights is None and default.budget_bytes is None
    assert small.weights == INT8_WEIGHT_ONLY  # no fp8 GPU here
    assert small.budget_bytes == 24 * 10**9
    assert small.text_encoders_off_gpu is False  # on the CPU they already are in CPU memory
    # 2K (and anything above 1K) decodes band by band; 1K and explicit modes are left alone.
    assert small.decode_mode("auto", 2048, 2048) == "exact" and small.decode_mode("auto", 1024, 1024) == "auto"
    assert small.decode_mode("full", 2048, 2048) == "full" and default.decode_mode("auto", 2048, 2048) == "auto"
    with pytest.raises(InvalidSpecError, match="memory_profile"):
        plan_memory("16gb", "cpu")


def test_weights_are_8_bit_and_the_adapter_slots_are_not(profiled: Generator) -> None:
    caps = profiled.capabilities()
    assert caps["memory_profile"] == "24gb" and caps["precision"] == INT8_WEIGHT_ONLY
    transformer = profiled.pipe.transformer
    block = transformer.transformer_blocks[0]
    quantized = block.attn.to_q.base_layer.weight
    assert "Int8" in type(quantized).__name__
    # The slots a swap copies into stay in the load's dtype.
    assert block.attn.to_q.lora_A["slot_0"].weight.dtype == torch.float32
    assert type(block.attn.to_q.lora_A["slot_0"].weight) is torch.nn.Parameter


def test_profile_generates_close_to_the_full_precision_model_and_hot_swaps(
    profiled: Generator, plain: Generator
) -> None:
    base = _image(profiled)
    assert _psnr(base, _image(plain)) > 30  # int8 weights: close to float32, not equal
    style = _image(profiled, (AdapterRef("style", 4.0),))
    other = _image(profiled, (AdapterRef("other", 4.0),))
    # Each adapter changes the image by more than rounding (the tiny adapters' deltas are ~5 % of a weight).
    assert np.abs(style - base).max() > 2 and np.abs(other - style).max() > 2
    again = _image(profiled, (AdapterRef("style", 4.0),))
    # Same process, same tensors, same kernels: swapping back gives the same image bitwise.
    assert np.array_equal(again, style)
    assert profiled.adapters.copies >= 3
    meta = profiled.generate(resolve_spec("x", "1k", width=64, height=64, steps=1)).metadata[0]
    assert meta["memory_profile"] == "24gb" and meta["precision"] == INT8_WEIGHT_ONLY


def test_above_1k_the_profile_decodes_band_by_band(profiled: Generator, plain: Generator) -> None:
    size = 1040
    assert size * size > BANDED_DECODE_ABOVE_PIXELS > 1024 * 1024
    spec = resolve_spec("a field", "2k", width=size, height=size, steps=1, seed=1, preset_adapter=False)
    assert profiled.generate(spec).metadata[0]["vae_decode"] == "exact"
    assert plain.generate(spec).metadata[0]["vae_decode"] == "full"


def test_quality_and_fast_share_8_bit_weights_only_under_the_profile() -> None:
    assert resolve_served_tiers(["quality", "turbo"], "cpu", quantized_weights=True) == ("quality", "turbo")
    with pytest.raises(TierUnavailableError, match="compute capability"):
        resolve_served_tiers(["quality", "fast"], "cpu", quantized_weights=True)  # still no fp8 here


def test_fp8_that_fails_falls_back_to_int8_and_says_why() -> None:
    transformer = build_tiny_pipeline("tiny").transformer
    fmt, note = quantize_for_plan(transformer, MemoryPlan("24gb", FLOAT8, False, None), "cpu")
    assert fmt == INT8_WEIGHT_ONLY
    assert note.startswith("fp8 failed") and "int8 weight-only" in note
    assert "Int8" in type(transformer.single_transformer_blocks[0].proj_out.weight).__name__


def test_moving_the_transformer_moves_the_slot_scalings_in_place() -> None:
    pipe = build_tiny_pipeline("tiny")
    generator = Generator(pipe, "tiny", compile=False)
    manager = generator.adapters
    scaling = manager._slots[0].scaling
    move_transformer(pipe.transformer, "meta")
    assert {p.device.type for p in pipe.transformer.parameters()} == {"meta"}
    # The same tensor object everywhere (the manager writes weights into it), now on the device.
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert layer.scaling["slot_0"] is scaling and scaling.device.type == "meta"
    # And the proportional-attention ratio every processor reads (a compiled graph's input).
    ratios = {id(m.processor.logit_ratio) for m in pipe.transformer.modules() if hasattr(m, "processor")}
    assert len(ratios) == 1
    assert pipe.transformer.single_transformer_blocks[0].attn.processor.logit_ratio.device.type == "meta"


def test_quantizing_leaves_inductor_settings_alone() -> None:
    # torchao's default switches on coordinate-descent tuning for the whole process: every later
    # compile of the worker would get slower.
    import torch._inductor.config as inductor

    from urae.memory_profile import quantize_block_linears

    before = (inductor.coordinate_descent_tuning, inductor.coordinate_descent_check_all_directions)
    quantize_block_linears(build_tiny_pipeline("tiny").transformer, INT8_WEIGHT_ONLY)
    assert (inductor.coordinate_descent_tuning, inductor.coordinate_descent_check_all_directions) == before == (False, False)
