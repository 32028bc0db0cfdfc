from __future__ import annotations

import pytest
import torch

from urae.tiny import build_tiny_pipeline
from urae.vae_decode import TileConfig, choose_mode, decode_latents


@pytest.fixture(scope="module")
def vae():
    return build_tiny_pipeline("tiny").vae


@pytest.mark.parametrize("shape", [(1, 4, 37, 53), (1, 4, 96, 80), (2, 4, 72, 72)])
def test_tiled_matches_full_numerically(vae, shape):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    full = decode_latents(vae, z, "full")
    tiled = decode_latents(vae, z, "tiled", TileConfig(tile=32, overlap=8))
    assert tiled.shape == full.shape == (shape[0], 3, shape[2] * 8, shape[3] * 8)
    assert torch.isfinite(tiled).all()
    diff = (tiled - full).abs()
    # GroupNorm statistics are per tile, so tiles differ slightly from a plain decode (random weights
    # exaggerate it); the blend must keep the mean error small and leave no unblended seam.
    assert float(diff.mean()) < 0.03, float(diff.mean())


def test_tiled_is_no_worse_than_diffusers_tiling(vae):
    z = torch.randn(1, 4, 96, 96, generator=torch.Generator().manual_seed(3))
    full = decode_latents(vae, z, "full")
    ours = decode_latents(vae, z, "tiled", TileConfig(tile=48, overlap=12))
    vae.enable_tiling()
    vae.tile_latent_min_size, vae.tile_sample_min_size, vae.tile_overlap_factor = 48, 384, 0.25
    try:
        with torch.no_grad():
            theirs = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
    finally:
        vae.disable_tiling()
    assert (ours - full).abs().mean() <= (theirs - full).abs().mean() * 1.05


def test_a_latent_smaller_than_one_tile_decodes_exactly(vae):
    z = torch.randn(1, 4, 20, 28, generator=torch.Generator().manual_seed(0))
    assert torch.equal(decode_latents(vae, z, "tiled", TileConfig(32, 8)), decode_latents(vae, z, "full"))


def test_auto_mode_tiles_above_2k():
    assert choose_mode("auto", 2048, 2048) == "full"
    assert choose_mode("auto", 4096, 4096) == "tiled"
    assert choose_mode("auto", 3072, 2048) == "tiled"
    with pytest.raises(ValueError):
        choose_mode("fast", 64, 64)


@pytest.mark.parametrize("shape", [(1, 4, 160, 136), (1, 4, 131, 137)])
def test_patched_convolutions_match_the_plain_decode(vae, shape, monkeypatch):
    import urae.vae_decode as vae_decode

    # Band the convolutions at this test's sizes (the default starts at 1024 x 1024 maps).
    monkeypatch.setattr(vae_decode, "PATCH_ABOVE_PIXELS", 64 * 64)
    calls = []
    original = vae_decode._banded_conv
    monkeypatch.setattr(vae_decode, "_banded_conv", lambda *a: calls.append(1) or original(*a))
    z = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = decode_latents(vae, z, "full")
        patched = decode_latents(vae, z, "patched")
    assert calls, "no convolution ran in bands"
    # The same sums; only the convolution kernel's blocking may order them differently.
    torch.testing.assert_close(patched, full, atol=1e-5, rtol=0)
    # The decoder is back to its own forward afterwards.
    assert all("forward" not in vars(m) for m in vae.decoder.modules())
