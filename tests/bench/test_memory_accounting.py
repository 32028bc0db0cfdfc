"""The 24gb memory profile, counted on the meta device with FLUX.1-dev's real shapes: what stays on the
GPU, and each 2K and 4K step's, decode's and prompt encode's peak (bench/memory_accounting.py).

The counting itself is checked first: on the tiny model the meta device gives the same bytes as a real
run on the CPU."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import memory_accounting as ma  # noqa: E402

from urae.memory_profile import FLOAT8, INT8_WEIGHT_ONLY, plan_memory  # noqa: E402
from urae.tiny import build_tiny_pipeline  # noqa: E402
from urae.vae_exact import exact_decode  # noqa: E402

pytest.importorskip("torchao", reason="the 24gb profile quantizes with torchao (urae-serve[gpu]), not installed")
GIB = 2**30
# What PyTorch's allocator may use on a 24 GB card: 24e9 bytes less the CUDA context (~0.5 GiB) and
# some room for the allocator's rounding.
USABLE = ma.BUDGET_BYTES - 1 * GIB


def test_counting_on_meta_equals_a_real_run() -> None:
    pipe = build_tiny_pipeline("tiny")
    for device in ("cpu", "meta"):
        pipe_on = copy.deepcopy(pipe)
        vae, transformer = pipe_on.vae.to(device), pipe_on.transformer.to(device)
        latents = torch.randn(1, vae.config.latent_channels, 48, 48).to(device)
        decode = ma.peak_bytes(lambda vae=vae, latents=latents: exact_decode(vae, latents))
        plain = ma.peak_bytes(lambda vae=vae, latents=latents: vae.decode(latents).sample)
        inputs = {"hidden_states": torch.randn(1, 256, 16), "encoder_hidden_states": torch.randn(1, 64, 32),
                  "pooled_projections": torch.randn(1, 32), "timestep": torch.tensor([0.5]),
                  "guidance": torch.tensor([3.5]), "img_ids": torch.zeros(256, 3), "txt_ids": torch.zeros(64, 3)}
        inputs = {k: v.to(device) for k, v in inputs.items()}
        step = ma.peak_bytes(lambda transformer=transformer, inputs=inputs: transformer(**inputs, return_dict=False)[0])
        if device == "cpu":
            real = (decode, plain, step)
    assert (decode, plain, step) == real  # bytes, exactly: the same tensors are created either way
    assert 0 < decode < plain / 3  # and the exact banded decode holds a fraction of the plain one (23 %)


@pytest.fixture(scope="module")
def accounts() -> dict[str, ma.Account]:
    return {
        "int8": ma.account("24gb", [2048, 4096], weights=INT8_WEIGHT_ONLY),
        "fp8": ma.account("24gb", [2048, 4096], weights=FLOAT8),
    }


def test_the_24gb_profile_holds_half_the_bf16_weights(accounts: dict[str, ma.Account]) -> None:
    bf16 = ma.tensor_bytes(ma.meta_transformer(None))
    assert 22.5 * GIB < bf16 < 23 * GIB  # FLUX.1-dev's 11.9 B parameters in bf16 (+ the adapter slots)
    for account in accounts.values():  # 1 byte per block weight; embedders, norms and adapter slots stay bf16
        assert account.transformer < 0.52 * bf16


def test_2k_and_4k_fit_24_gb_under_the_profile(accounts: dict[str, ma.Account]) -> None:
    for name, account in accounts.items():
        assert account.resident < 12.5 * GIB, name  # 8-bit transformer + slots + VAE; text encoders streamed
        for size in (2048, 4096):
            counted = account.sizes[size]
            assert counted["decode_mode"] == "exact"  # the banded decode from 2K up
            assert counted["decode"] < 5 * GIB and counted["text"] < 1 * GIB
    # int8 weight-only fits even uncompiled, at both sizes; fp8 uncompiled only at 2K: its activation
    # scaling holds float32 copies (compiled, inductor fuses them), so the profile takes fp8 only when
    # the blocks are compiled.
    int8, fp8 = accounts["int8"].sizes, accounts["fp8"].sizes
    assert int8[2048]["peak"] < USABLE and int8[4096]["peak"] < USABLE
    assert fp8[2048]["peak"] < USABLE < fp8[4096]["peak"]
    assert plan_memory("24gb", "cpu", compiled=False).weights == INT8_WEIGHT_ONLY
