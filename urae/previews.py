"""Live previews: a small RGB image made from the latents of a generation in progress.

No VAE decode: FLUX's 16 latent channels are projected to RGB by a fixed linear map plus a bias
(the factors published for FLUX.1 by ComfyUI, ``latent_formats.Flux``). A model whose latents differ
(the tiny test models have 4 channels) gets its own map, fitted by least squares against its own VAE
on a few seeded random latents the first time it is needed. When the weights of a tiny autoencoder
(diffusers ``AutoencoderTiny``, "taef1") are on disk, it can be used instead.

Previews never hold up denoising: :class:`PreviewRenderer` takes a copy of the latents at a step
boundary and renders it in a background thread; a preview that arrives while the previous one is still
being rendered is dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("urae.previews")

DEFAULT_MAX_SIDE = 256

# FLUX.1 latent -> RGB (rows: latent channels, columns: R, G, B) and bias, applied to the latents the
# transformer denoises (after the VAE's scaling and shift), with the result in [-1, 1].
FLUX_LATENT_RGB_FACTORS = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)
FLUX_LATENT_CHANNELS = len(FLUX_LATENT_RGB_FACTORS)

# The fit for other models: this many random latents of this size, always the same seed.
FIT_SAMPLES = 4
FIT_LATENT_SIDE = 16
FIT_SEED = 0


@dataclass(frozen=True)
class LatentRgbMap:
    """``rgb = latents @ factors + bias`` per latent pixel, in [-1, 1]; ``source`` says where it came from."""

    factors: torch.Tensor  # (channels, 3)
    bias: torch.Tensor  # (3,)
    source: str

    @property
    def channels(self) -> int:
        return int(self.factors.shape[0])


def flux_latent_rgb_map() -> LatentRgbMap:
    """The published map of FLUX.1's 16-channel latents."""
    return LatentRgbMap(
        torch.tensor(FLUX_LATENT_RGB_FACTORS, dtype=torch.float32),
        torch.tensor(FLUX_LATENT_RGB_BIAS, dtype=torch.float32),
        "flux.1 published factors",
    )


@torch.no_grad()
def fit_latent_rgb_map(vae: Any, samples: int = FIT_SAMPLES, side: int = FIT_LATENT_SIDE, seed: int = FIT_SEED) -> LatentRgbMap:
    """A least-squares linear map from this VAE's (scaled, shifted) latents to its decoded colours.

    Each decoded image is averaged over the VAE's pixel block of each latent pixel, and
    ``[latents, 1] @ W = rgb`` is solved over every latent pixel of ``samples`` seeded random latents.
    Deterministic for a given VAE (fixed seed, CPU generator).
    """
    channels = int(vae.config.latent_channels)
    scaling = float(vae.config.scaling_factor)
    shift = float(vae.config.get("shift_factor") or 0.0)
    param = next(vae.parameters())
    latents = torch.randn(samples, channels, side, side, generator=torch.Generator("cpu").manual_seed(seed))
    decoded = vae.decode((latents / scaling + shift).to(param.device, param.dtype)).sample.float().cpu()
    block = decoded.shape[-1] // side
    colours = F.avg_pool2d(decoded.clamp(-1, 1), block)  # (samples, 3, side, side)
    x = latents.permute(0, 2, 3, 1).reshape(-1, channels)
    x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    y = colours.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x.double(), y.double()).solution.float()
    return LatentRgbMap(solution[:channels].contiguous(), solution[channels].contiguous(), "least-squares fit to this VAE")


def latent_rgb_map_for(vae: Any) -> LatentRgbMap:
    """FLUX's published map for a 16-channel VAE, a fit to the VAE otherwise."""
    if int(vae.config.latent_channels) == FLUX_LATENT_CHANNELS:
        return flux_latent_rgb_map()
    return fit_latent_rgb_map(vae)


def preview_size(width: int, height: int, max_side: int = DEFAULT_MAX_SIDE) -> tuple[int, int]:
    """Width and height of the preview of a ``width`` x ``height`` image: ``max_side`` on the long side,
    or the image's own size when it is smaller."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def unpack_latents(packed: torch.Tensor, height: int, width: int, vae_scale_factor: int = 8) -> torch.Tensor:
    """FLUX's 2x2-packed sequence (batch, tokens, channels*4) -> (batch, channels, height/8, width/8)."""
    batch, _, packed_channels = packed.shape
    h = 2 * (height // (vae_scale_factor * 2))
    w = 2 * (width // (vae_scale_factor * 2))
    x = packed.view(batch, h // 2, w // 2, packed_channels // 4, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(batch, packed_channels // 4, h, w)


@torch.no_grad()
def latents_to_preview(
    latents: torch.Tensor, rgb_map: LatentRgbMap, width: int, height: int, max_side: int = DEFAULT_MAX_SIDE
) -> np.ndarray:
    """Unpacked latents (channels, h, w) or (1, channels, h, w) -> uint8 RGB (H, W, 3), long side ``max_side``.

    The latents are averaged down to the preview size first (a linear map commutes with averaging),
    so the work is the preview's size whatever the image's.
    """
    if latents.dim() == 4:
        latents = latents[0]
    out_w, out_h = preview_size(width, height, max_side)
    x = latents.float()
    if x.shape[-1] > out_w or x.shape[-2] > out_h:
        x = F.adaptive_avg_pool2d(x.unsqueeze(0), (min(out_h, x.shape[-2]), min(out_w, x.shape[-1])))[0]
    factors = rgb_map.factors.to(x.device)
    bias = rgb_map.bias.to(x.device)
    rgb = torch.einsum("chw,cr->rhw", x, factors) + bias[:, None, None]
    if rgb.shape[-2:] != (out_h, out_w):
        rgb = F.interpolate(rgb.unsqueeze(0), size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).cpu().numpy()


class TinyAutoencoderPreview:
    """Previews decoded by a tiny autoencoder (diffusers AutoencoderTiny, e.g. "taef1") from a local folder."""

    def __init__(self, decoder: Any, scaling_factor: float, shift_factor: float):
        self.decoder = decoder
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor

    @classmethod
    def load(cls, path: str | Path, vae: Any, device: torch.device | str, dtype: torch.dtype) -> TinyAutoencoderPreview:
        """Load from a saved folder, never from the hub; raises OSError / ValueError when unusable."""
        from diffusers import AutoencoderTiny

        decoder = AutoencoderTiny.from_pretrained(str(path), local_files_only=True).to(device, dtype).eval()
        if int(decoder.config.latent_channels) != int(vae.config.latent_channels):
            raise ValueError(
                f"{path}: {decoder.config.latent_channels} latent channels, the model's VAE has {vae.config.latent_channels}"
            )
        return cls(decoder, float(vae.config.scaling_factor), float(vae.config.get("shift_factor") or 0.0))

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, width: int, height: int, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
        if latents.dim() == 3:
            latents = latents.unsqueeze(0)
        out_w, out_h = preview_size(width, height, max_side)
        param = next(self.decoder.parameters())
        # Decode at most at twice the preview size: the decoder upsamples by 8.
        small = F.adaptive_avg_pool2d(latents.float(), (min(latents.shape[-2], max(1, out_h // 4)),
                                                         min(latents.shape[-1], max(1, out_w // 4))))
        raw = small / self.scaling_factor + self.shift_factor
        image = self.decoder.decode(raw.to(param.device, param.dtype)).sample.float()
        image = F.interpolate(image, size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
        pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(1, 2, 0).cpu().numpy()


@dataclass(frozen=True)
class PreviewFrame:
    """One rendered preview: after ``step`` of ``total`` (counted over all images of the request)."""

    step: int
    total: int
    index: int  # which image of the request
    pixels: np.ndarray  # (height, width, 3) uint8


PreviewSink = Callable[[PreviewFrame], None]
LatentRenderer = Callable[[torch.Tensor, int, int], np.ndarray]


class PreviewRenderer:
    """Renders previews in one background thread; at most one in flight, later ones dropped meanwhile.

    ``submit`` costs the denoising loop one copy of the latents (on their device) and nothing else;
    the projection, the copy to the CPU and ``sink`` (e.g. JPEG encoding and publishing) run in the
    thread. ``close`` waits for the preview in flight so none is delivered after the image is done.
    """

    def __init__(self, render: LatentRenderer, sink: PreviewSink, width: int, height: int, vae_scale_factor: int = 8):
        self._render = render
        self._sink = sink
        self._width, self._height = width, height
        self._vae_scale_factor = vae_scale_factor
        self._lock = threading.Lock()
        self._pending: tuple[int, int, int, torch.Tensor] | None = None
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self.submitted = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="urae-preview", daemon=True)
        self._thread.start()

    def submit(self, step: int, total: int, index: int, packed: torch.Tensor) -> bool:
        """Queue a preview of these packed latents; False (dropped) when one is still being rendered."""
        with self._lock:
            if self._closed or not self._idle.is_set():
                self.dropped += 1
                return False
            self._idle.clear()
            self._pending = (step, total, index, packed.detach()[:1].clone())
            self.submitted += 1
        self._wake.set()
        return True

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                job, self._pending = self._pending, None
                closed = self._closed
            if job is not None:
                step, total, index, packed = job
                try:
                    latents = unpack_latents(packed, self._height, self._width, self._vae_scale_factor)
                    self._sink(PreviewFrame(step, total, index, self._render(latents, self._width, self._height)))
                except Exception:  # a preview is best effort: never fail the generation for one
                    log.warning("preview at step %d not rendered", step, exc_info=True)
                finally:
                    self._idle.set()
            if closed:
                return

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting previews; wait (bounded) for the one in flight."""
        with self._lock:
            self._closed = True
        self._wake.set()
        self._thread.join(timeout_s)
