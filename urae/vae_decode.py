"""VAE decoding strategies for 2K/4K latents.

A plain decode holds the decoder's full-resolution feature maps (128 channels x H x W for FLUX's VAE:
several GB at 4096 px) at once. The strategies (``mode``):

- ``full``: the plain decode, used up to the 2K pixel budget at every aspect ratio.
- ``exact``: the same numbers band by band in bounded memory (``urae.vae_exact``); ``auto`` picks it
  above the 2K budget.
- ``tiled``: overlapping latent tiles blended with linear feathering into a preallocated image.
  GroupNorm statistics are then per tile, so the output differs slightly from a plain decode; it is
  the fallback when the exact decode runs out of memory (``auto``), and an explicit option.
- ``patched``: only the decoder's convolutions in bands; exact but with most of the plain peak.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from urae.vae_exact import exact_decode, exact_encode

# The 2K presets keep 2048 x 2048 pixels at every aspect ratio, rounded to multiples of 16 (up to
# ~1% more, e.g. 2368 x 1776 at 4:3): "auto" decodes in full up to this many pixels.
FULL_DECODE_MAX_PIXELS = int(2048 * 2048 * 1.02)
DECODE_MODES = ("auto", "full", "exact", "tiled", "patched")


@dataclass(frozen=True)
class TileConfig:
    tile: int = 128  # tile side in latent pixels (1024 px for a scale-8 VAE)
    overlap: int = 32  # overlap between neighbouring tiles in latent pixels


def choose_mode(mode: str, height: int, width: int) -> str:
    """Resolve ``auto`` by pixel count: ``full`` within the 2K budget, ``exact`` above it."""
    if mode == "auto":
        return "exact" if height * width > FULL_DECODE_MAX_PIXELS else "full"
    if mode not in DECODE_MODES:
        raise ValueError(f"vae decode mode {mode!r} is not one of {', '.join(DECODE_MODES)}")
    return mode


# Convolutions over more than this many pixels run in horizontal bands (see patched_convolutions).
PATCH_ABOVE_PIXELS = 1024 * 1024
PATCH_ROWS = 256


def _banded_conv(conv: torch.nn.Conv2d, x: torch.Tensor, rows: int) -> torch.Tensor:
    """``conv(x)`` computed ``rows`` output rows at a time: the same sums (equal up to the rounding
    of the convolution kernel's blocking, ~1e-6).

    Each band reads its rows plus the kernel's halo, so only one band's temporaries (im2col buffers,
    workspace) exist at a time instead of the whole map's.
    """
    pad_h, pad_w = (int(p) for p in conv.padding)  # a tuple of ints: checked by patched_convolutions
    height = x.shape[2]
    out_h = height + 2 * pad_h - (conv.kernel_size[0] - 1)
    out = x.new_empty(
        x.shape[0], conv.out_channels, out_h, x.shape[3] + 2 * pad_w - (conv.kernel_size[1] - 1)
    )
    for top in range(0, out_h, rows):
        bottom = min(top + rows, out_h)
        # Input rows needed for output rows [top, bottom): [top - pad, bottom + pad) clipped to x.
        start, stop = top - pad_h, bottom - 1 - pad_h + conv.kernel_size[0]
        band = x[:, :, max(start, 0) : min(stop, height)]
        band = F.pad(band, (0, 0, max(-start, 0), max(stop - height, 0)))
        out[:, :, top:bottom] = F.conv2d(band, conv.weight, conv.bias, 1, (0, pad_w))
    return out


@contextmanager
def patched_convolutions(vae: AutoencoderKL, rows: int = PATCH_ROWS) -> Iterator[None]:
    """Within the block, the decoder's large convolutions run in bands of ``rows`` rows.

    Exact (unlike tiling, GroupNorm still sees the whole map), but every full-resolution activation
    still exists at once: it only removes the convolutions' temporaries. Measured at 4096 px on the
    tiny model: 85 % of the plain decode's peak, against 26 % for tiling (bench/vae_decode.py), so
    ``exact`` (every activation in bands) replaces it as the exact decode; this stays for comparison.
    """
    patched = []
    for module in vae.decoder.modules():
        if (
            isinstance(module, torch.nn.Conv2d)
            and module.stride == (1, 1)
            and module.dilation == (1, 1)
            and module.groups == 1
            and module.padding_mode == "zeros"
            and isinstance(module.padding, tuple)
        ):
            original = module.forward

            def forward(x: torch.Tensor, conv: torch.nn.Conv2d = module, plain=original) -> torch.Tensor:
                if x.shape[2] * x.shape[3] <= PATCH_ABOVE_PIXELS or x.shape[2] <= rows:
                    return plain(x)
                return _banded_conv(conv, x, rows)

            module.forward = forward  # type: ignore[method-assign,assignment]
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


def _positions(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts covering [0, length) with the last tile flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(size: int, overlap: int, at_start: bool, at_end: bool, device: torch.device) -> torch.Tensor:
    """1-D blend weights: linear ramps over the overlap on sides that touch another tile."""
    weight = torch.ones(size, device=device, dtype=torch.float32)
    ramp = torch.linspace(0.0, 1.0, overlap + 2, device=device, dtype=torch.float32)[1:-1]
    n = min(overlap, size)
    if n and not at_start:
        weight[:n] = ramp[:n]
    if n and not at_end:
        weight[size - n :] = torch.minimum(weight[size - n :], ramp[:n].flip(0))
    return weight


@torch.no_grad()
def tiled_decode(
    vae: AutoencoderKL, latents: torch.Tensor, config: TileConfig = TileConfig()
) -> torch.Tensor:
    """Decode scaled-and-shifted-back latents (B, C, h, w) into images (B, 3, H, W) in [-1, 1] tile by tile."""
    if config.overlap * 2 >= config.tile:
        raise ValueError("overlap must be less than half the tile size")
    batch, _, lat_h, lat_w = latents.shape
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    tile_h, tile_w = min(config.tile, lat_h), min(config.tile, lat_w)
    stride_h, stride_w = tile_h - config.overlap, tile_w - config.overlap
    rows = _positions(lat_h, tile_h, max(stride_h, 1))
    cols = _positions(lat_w, tile_w, max(stride_w, 1))
    out = torch.zeros(batch, 3, lat_h * scale, lat_w * scale, dtype=torch.float32, device=latents.device)
    weights = torch.zeros(lat_h * scale, lat_w * scale, dtype=torch.float32, device=latents.device)
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            z = latents[:, :, top : top + tile_h, left : left + tile_w]
            if vae.config.use_post_quant_conv:
                z = vae.post_quant_conv(z)
            tile = vae.decoder(z).float()
            # Overlap actually shared with the neighbour, in output pixels.
            ov_h = (rows[i - 1] + tile_h - top) * scale if i > 0 else 0
            ov_h_next = (top + tile_h - rows[i + 1]) * scale if i + 1 < len(rows) else 0
            ov_w = (cols[j - 1] + tile_w - left) * scale if j > 0 else 0
            ov_w_next = (left + tile_w - cols[j + 1]) * scale if j + 1 < len(cols) else 0
            wy = torch.minimum(
                _ramp(tile.shape[2], ov_h, at_start=i == 0, at_end=True, device=tile.device),
                _ramp(tile.shape[2], ov_h_next, at_start=True, at_end=i + 1 == len(rows), device=tile.device),
            )
            wx = torch.minimum(
                _ramp(tile.shape[3], ov_w, at_start=j == 0, at_end=True, device=tile.device),
                _ramp(tile.shape[3], ov_w_next, at_start=True, at_end=j + 1 == len(cols), device=tile.device),
            )
            mask = wy[:, None] * wx[None, :]
            y0, x0 = top * scale, left * scale
            out[:, :, y0 : y0 + tile.shape[2], x0 : x0 + tile.shape[3]].addcmul_(tile, mask)
            weights[y0 : y0 + tile.shape[2], x0 : x0 + tile.shape[3]].add_(mask)
            del tile
    out.div_(weights)
    return out


@torch.no_grad()
def decode_latents_reporting_mode(
    vae: AutoencoderKL, latents: torch.Tensor, mode: str = "auto", config: TileConfig = TileConfig()
) -> tuple[torch.Tensor, str]:
    """Decode unpacked FLUX latents (B, C, h, w) to images in [-1, 1], undoing scaling and shift;
    also return the strategy that produced them.

    With ``auto``, a decode that runs out of device memory is retried in tiles (the returned mode
    then says ``tiled``); an explicitly requested mode is never swapped for another.
    """
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    latents = latents.to(vae.dtype)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    resolved = choose_mode(mode, latents.shape[2] * scale, latents.shape[3] * scale)
    if resolved == "tiled":
        return tiled_decode(vae, latents, config), resolved
    if resolved == "patched":
        with patched_convolutions(vae):
            return _plain_decode(vae, latents), resolved
    try:
        if resolved == "exact":
            return exact_decode(vae, latents), resolved
        return _plain_decode(vae, latents), resolved
    except torch.OutOfMemoryError:
        if mode != "auto":
            raise
    # Outside the except block: its traceback would keep the failed attempt's tensors alive.
    if latents.device.type == "cuda":
        torch.cuda.empty_cache()
    return tiled_decode(vae, latents, config), "tiled"


def _plain_decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    decoder_input = vae.post_quant_conv(latents) if vae.config.use_post_quant_conv else latents
    return vae.decoder(decoder_input).float()


def decode_latents(
    vae: AutoencoderKL, latents: torch.Tensor, mode: str = "auto", config: TileConfig = TileConfig()
) -> torch.Tensor:
    """Decode unpacked FLUX latents (B, C, h, w) to images in [-1, 1], undoing scaling and shift."""
    return decode_latents_reporting_mode(vae, latents, mode, config)[0]


@torch.no_grad()
def encode_pixels(vae: AutoencoderKL, pixels: torch.Tensor, mode: str = "auto") -> DiagonalGaussianDistribution:
    """The VAE posterior of images (B, 3, H, W) in [-1, 1]: a plain ``vae.encode`` (``full``) or the
    same numbers band by band in bounded memory (``exact``); ``auto`` picks by pixel count like the
    decode."""
    resolved = choose_mode(mode, pixels.shape[2], pixels.shape[3])
    if resolved == "exact":
        return exact_encode(vae, pixels.to(vae.dtype))
    if resolved != "full":
        raise ValueError(f"vae encode mode {mode!r} is not one of auto, full, exact")
    return vae.encode(pixels.to(vae.dtype)).latent_dist
