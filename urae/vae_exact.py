"""Exact VAE decode and encode in bounded memory: the same numbers as a plain pass, band by band.

A GroupNorm needs the mean and variance of its WHOLE input, which is why tiling is not exact. Once
those statistics are known the normalisation is a per-channel affine map, and everything else in
diffusers' AutoencoderKL (SiLU, 3x3 convolutions, nearest upsampling, strided downsampling, residual
adds, 1x1 shortcuts) only looks at a few neighbouring rows. So each stage is computed as a lazy graph
of row-band operations over a stored tensor:

- one pass over bands gathers a GroupNorm's per-channel sum and sum of squares (float64), then the
  bands downstream of it can be normalised;
- a resnet's output (the residual stream) is stored at its resolution, written in place over its
  input when the shapes match (the input rows the next band still needs are saved first), together
  with the channel sums its successor's norm1 needs; the hidden activation between conv1 and conv2
  is recomputed band by band instead of stored (one extra conv per resnet);
- an upsampler's (or downsampler's) output is never stored: the next resnet recomputes it band by
  band from the lower-resolution tensor;
- at the output resolution (the decoder's last up block, the encoder's first down block) nothing is
  stored by default: every pass recomputes that stage from the half-resolution map, since the largest
  maps live there (``keep_full_resolution`` trades that time for one more full-resolution map).

The peak is one or two stored maps below the output resolution, the output, and a few bands, instead
of several full-resolution activations at once (bench/vae_decode.py: 29 % of the plain decode's peak
at 4096 px, max |diff| 5e-6). Work at the latent resolution (the mid block with its attention, and the
encoder's head) runs whole, as in a plain pass: it is small.
Only plain torch ops are used, so the same code runs on CUDA.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D


class UnsupportedVAEError(ValueError):
    """The VAE has a layer the exact banded pass does not implement."""


def default_band_rows(height: int) -> int:
    """Rows per band: 1/32 of the map (bounded temporaries), at least 32 (halo overhead stays low)."""
    return max(32, math.ceil(height / 32))


class _Node(ABC):
    """A (B, C, H, W) tensor that can be produced in row bands."""

    batch: int
    channels: int
    height: int
    width: int

    @abstractmethod
    def rows(self, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of this tensor (0 <= a < b <= height)."""

    @abstractmethod
    def span(self, source: _Stored, a: int, b: int) -> tuple[int, int] | None:
        """Rows of ``source`` that ``rows(a, b)`` reads, or None if it does not read it."""

    def reset(self) -> None:  # noqa: B027 - most nodes keep no band; those that do override it
        """Drop any cached band (end of a pass)."""


class _Stored(_Node):
    """A materialised tensor. While it is being overwritten in place, the rows above ``written``
    hold new values and ``saved`` keeps the original rows [saved_lo, written) still to be read."""

    def __init__(self, tensor: torch.Tensor, channel_sums: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.tensor = tensor
        self.batch, self.channels, self.height, self.width = tensor.shape
        self.channel_sums = channel_sums  # (sum, sum of squares) per (batch, channel), float64
        self.written = 0
        self.saved: torch.Tensor | None = None
        self.saved_lo = 0

    def rows(self, a: int, b: int) -> torch.Tensor:
        if a >= self.written:
            return self.tensor[:, :, a:b]
        if a < self.saved_lo or self.saved is None:
            raise RuntimeError("band schedule read a row that was already overwritten")
        top = self.saved[:, :, a - self.saved_lo : min(b, self.written) - self.saved_lo]
        if b <= self.written:
            return top
        return torch.cat([top, self.tensor[:, :, self.written : b]], dim=2)

    def span(self, source: _Stored, a: int, b: int) -> tuple[int, int] | None:
        return (a, b) if source is self else None


class _Shared(_Node):
    """Caches its input's latest band, so two consumers (a resnet's conv1 and its shortcut) of a
    recomputed tensor compute each band once."""

    def __init__(self, inp: _Node):
        self.inp = inp
        self.batch, self.channels, self.height, self.width = inp.batch, inp.channels, inp.height, inp.width
        self._cache: tuple[int, int, torch.Tensor] | None = None

    def rows(self, a: int, b: int) -> torch.Tensor:
        if self._cache is not None:
            lo, hi, band = self._cache
            if lo <= a and b <= hi:
                return band[:, :, a - lo : b - lo]
        band = self.inp.rows(a, b)
        self._cache = (a, b, band)
        return band

    def span(self, source: _Stored, a: int, b: int) -> tuple[int, int] | None:
        return self.inp.span(source, a, b)

    def reset(self) -> None:
        self._cache = None
        self.inp.reset()


class _Conv(_Node):
    """A Conv2d (any kernel, stride, zero padding) plus optional extra zero padding (left, right,
    top, bottom), as Downsample2D adds before its stride-2 convolution."""

    def __init__(self, conv: torch.nn.Conv2d, inp: _Node, extra_pad: tuple[int, int, int, int] = (0, 0, 0, 0)):
        if (
            conv.groups != 1
            or conv.dilation != (1, 1)
            or conv.padding_mode != "zeros"
            or not isinstance(conv.padding, tuple)
            or conv.stride[0] != conv.stride[1]
        ):
            raise UnsupportedVAEError(f"convolution {conv} is not supported by the exact banded pass")
        self.conv, self.inp = conv, inp
        self.k = int(conv.kernel_size[0])
        self.stride = int(conv.stride[0])
        ph, pw = (int(p) for p in conv.padding)
        left, right, top, bottom = extra_pad
        self.pad_top, self.pad_bottom = ph + top, ph + bottom
        self.pad_left, self.pad_right = pw + left, pw + right
        self.batch, self.channels = inp.batch, conv.out_channels
        self.height = (inp.height + self.pad_top + self.pad_bottom - self.k) // self.stride + 1
        self.width = (inp.width + self.pad_left + self.pad_right - int(conv.kernel_size[1])) // self.stride + 1

    def _input_rows(self, a: int, b: int) -> tuple[int, int]:
        return a * self.stride - self.pad_top, (b - 1) * self.stride - self.pad_top + self.k

    def rows(self, a: int, b: int) -> torch.Tensor:
        lo, hi = self._input_rows(a, b)
        band = self.inp.rows(max(lo, 0), min(hi, self.inp.height))
        symmetric = self.pad_left == self.pad_right
        band = F.pad(
            band,
            (0 if symmetric else self.pad_left, 0 if symmetric else self.pad_right, max(-lo, 0), max(hi - self.inp.height, 0)),
        )
        padding = (0, self.pad_left if symmetric else 0)
        return F.conv2d(band, self.conv.weight, self.conv.bias, self.stride, padding)

    def span(self, source: _Stored, a: int, b: int) -> tuple[int, int] | None:
        lo, hi = self._input_rows(a, b)
        return self.inp.span(source, max(lo, 0), min(hi, self.inp.height))

    def reset(self) -> None:
        self.inp.reset()


class _NormSiLU(_Node):
    """GroupNorm with statistics gathered beforehand (per-channel scale and bias), then SiLU."""

    def __init__(self, inp: _Node, scale: torch.Tensor, bias: torch.Tensor):
        self.inp, self.scale, self.bias = inp, scale, bias
        self.batch, self.channels, self.height, self.width = inp.batch, inp.channels, inp.height, inp.width

    def rows(self, a: int, b: int) -> torch.Tensor:
        band = self.inp.rows(a, b)
        # Normalise in float32 like GroupNorm's kernels do, then round to the model's dtype.
        out = torch.addcmul(self.bias, band.float(), self.scale).to(band.dtype)
        return F.silu(out, inplace=True)

    def span(self, source: _Stored, a: int, b: int) -> tuple[int, int] | None:
        return self.inp.span(source, a, b)

    def reset(self) -> None:
        self.inp.reset()


class _Upsample(_Node):
    """Nearest-neighbour 2x upsampling."""

    def __init__(self, inp: _Node):
        self.inp = inp
        self.batch, self.channels, self.height, self.width = inp.batch, inp.channels, inp.height * 2, inp.width * 2

    def rows(self, a: int, b: int) -> torch.Tensor:
        lo, hi = a // 2, (b + 1) // 2
        band = F.interpolate(self.inp.rows(lo, hi), scale_factor=2.0, mode="nearest")
        return band[:, :, a - 2 * lo : b - 2 * lo]

    def span(self, source: _Stored, a: int, b: int) -> tuple[int, int] | None:
        return self.inp.span(source, a // 2, (b + 1) // 2)

    def reset(self) -> None:
        self.inp.reset()


class _ResidualAdd(_Node):
    """(shortcut + hidden) / scale, as ResnetBlock2D ends."""

    def __init__(self, hidden: _Node, shortcut: _Node, output_scale_factor: float):
        self.hidden, self.shortcut, self.divisor = hidden, shortcut, output_scale_factor
        self.batch, self.channels, self.height, self.width = hidden.batch, hidden.channels, hidden.height, hidden.width

    def rows(self, a: int, b: int) -> torch.Tensor:
        hidden = self.hidden.rows(a, b)  # first: it reads the wider band a shared input then caches
        out = self.shortcut.rows(a, b) + hidden
        return out / self.divisor if self.divisor != 1.0 else out

    def span(self, source: _Stored, a: int, b: int) -> tuple[int, int] | None:
        spans = [s for s in (self.hidden.span(source, a, b), self.shortcut.span(source, a, b)) if s is not None]
        if not spans:
            return None
        return min(s[0] for s in spans), max(s[1] for s in spans)

    def reset(self) -> None:
        self.hidden.reset()
        self.shortcut.reset()


def _bands(height: int, rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + rows, height)) for a in range(0, height, rows)]


def _accumulate(band: torch.Tensor, sums: list[torch.Tensor]) -> None:
    """Add a band's per (batch, channel) sum and sum of squares, in float64, to ``sums``."""
    band64 = band.double()
    total, squares = band64.sum(dim=(2, 3)), (band64 * band64).sum(dim=(2, 3))
    if sums:
        sums[0] += total
        sums[1] += squares
    else:
        sums.extend((total, squares))


def _channel_sums(node: _Node, band_rows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, channel) sum and sum of squares of ``node`` in float64, one pass over its bands."""
    if isinstance(node, _Stored) and node.channel_sums is not None:
        return node.channel_sums
    sums: list[torch.Tensor] = []
    for a, b in _bands(node.height, band_rows or default_band_rows(node.height)):
        _accumulate(node.rows(a, b), sums)
    node.reset()
    return sums[0], sums[1]


def _norm_silu(norm: torch.nn.Module, inp: _Node, band_rows: int | None) -> _NormSiLU:
    """``silu(norm(inp))`` with the norm's statistics taken over the whole of ``inp``."""
    if not isinstance(norm, torch.nn.GroupNorm):
        raise UnsupportedVAEError(f"{type(norm).__name__} is not a GroupNorm")
    total, squares = _channel_sums(inp, band_rows)
    groups = norm.num_groups
    count = inp.height * inp.width * (inp.channels // groups)
    mean = total.view(inp.batch, groups, -1).sum(-1) / count
    var = (squares.view(inp.batch, groups, -1).sum(-1) / count - mean * mean).clamp_min(0.0)
    rstd = (var + norm.eps).rsqrt()
    per_channel = inp.channels // groups
    mean_c = mean.repeat_interleave(per_channel, dim=1)
    rstd_c = rstd.repeat_interleave(per_channel, dim=1)
    weight = norm.weight.double() if norm.affine else torch.ones_like(rstd_c[0])
    bias = norm.bias.double() if norm.affine else torch.zeros_like(rstd_c[0])
    scale = rstd_c * weight
    shift = bias - mean_c * scale
    return _NormSiLU(inp, scale.float()[:, :, None, None], shift.float()[:, :, None, None])


def _materialise(node: _Node, band_rows: int | None, over: _Stored | None = None) -> _Stored:
    """Compute ``node`` band by band into a tensor (``over``'s, in place, when given), gathering its
    channel sums on the way."""
    target = over.tensor if over is not None else None
    sums: list[torch.Tensor] = []
    bands = _bands(node.height, band_rows or default_band_rows(node.height))
    for i, (a, b) in enumerate(bands):
        band = node.rows(a, b)
        _accumulate(band, sums)
        if target is None:
            target = band.new_empty(node.batch, node.channels, node.height, node.width)
        if over is not None:
            # Keep the original rows the next band still reads before overwriting [a, b).
            nxt = node.span(over, *bands[i + 1]) if i + 1 < len(bands) else None
            keep_lo = b if nxt is None else min(nxt[0], b)
            pieces = []
            if keep_lo < a:
                assert over.saved is not None
                pieces.append(over.saved[:, :, keep_lo - over.saved_lo :])
            pieces.append(over.tensor[:, :, max(keep_lo, a) : b])
            over.saved = torch.cat(pieces, dim=2)  # a copy: the rows below are overwritten next
            over.saved_lo = keep_lo
        target[:, :, a:b] = band
        if over is not None:
            over.written = b
        del band
    node.reset()
    if over is not None:
        over.saved = None  # the old tensor object is finished; its storage now holds the output
    assert target is not None
    return _Stored(target, (sums[0], sums[1]))


def _resnet(block: torch.nn.Module, x: _Node, band_rows: int | None, store: bool) -> _Node:
    """One ResnetBlock2D: two statistics passes (norm1 is free when ``x`` was stored with its sums),
    then with ``store`` one pass that writes the output; without, the output stays lazy (recomputed
    by every later pass that reads it)."""
    if (
        not isinstance(block, ResnetBlock2D)
        or block.upsample is not None
        or block.downsample is not None
        or block.time_emb_proj is not None
        or not isinstance(block.nonlinearity, torch.nn.SiLU)
        or (block.training and block.dropout.p > 0)
    ):
        raise UnsupportedVAEError(f"{type(block).__name__} is not a plain VAE resnet")
    shared = x if isinstance(x, _Stored) else _Shared(x)
    hidden = _Conv(block.conv1, _norm_silu(block.norm1, shared, band_rows))
    hidden = _Conv(block.conv2, _norm_silu(block.norm2, hidden, band_rows))
    shortcut: _Node = shared if block.conv_shortcut is None else _Conv(block.conv_shortcut, shared)
    out = _ResidualAdd(hidden, shortcut, float(block.output_scale_factor))
    if not store:
        return _Shared(out)
    in_place = (
        isinstance(shared, _Stored)
        and (out.channels, out.height, out.width) == (shared.channels, shared.height, shared.width)
    )
    return _materialise(out, band_rows, over=shared if in_place else None)  # type: ignore[arg-type]


def _upsampled(up: torch.nn.Module, x: _Node) -> _Node:
    if not isinstance(up, Upsample2D) or up.use_conv_transpose or up.norm is not None or not up.interpolate:
        raise UnsupportedVAEError(f"{type(up).__name__} is not a nearest-neighbour upsampler")
    node: _Node = _Upsample(x)
    return _Conv(up.conv, node) if up.use_conv else node


def _downsampled(down: torch.nn.Module, x: _Node) -> _Node:
    if not isinstance(down, Downsample2D) or down.norm is not None or not down.use_conv:
        raise UnsupportedVAEError(f"{type(down).__name__} is not a strided-convolution downsampler")
    extra = (0, 1, 0, 1) if down.padding == 0 else (0, 0, 0, 0)
    return _Conv(down.conv, x, extra)


@torch.no_grad()
def exact_decode(
    vae: AutoencoderKL, latents: torch.Tensor, band_rows: int | None = None, keep_full_resolution: bool = False
) -> torch.Tensor:
    """``vae.decoder`` applied to unscaled latents (B, C, h, w): images (B, 3, H, W) in float32, equal
    to a plain decode up to float rounding, in a fraction of its memory.

    ``keep_full_resolution`` stores the output-resolution resnets' outputs too: fewer recomputed
    convolutions, one more full-resolution map in memory.
    """
    decoder = vae.decoder
    z = vae.post_quant_conv(latents) if vae.config.use_post_quant_conv else latents
    z = decoder.mid_block(decoder.conv_in(z))  # latent resolution: small, and attention needs it whole
    x: _Node = _Stored(z)
    del z
    out_height = x.height * 2 ** sum(len(block.upsamplers or []) for block in decoder.up_blocks)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            # Nothing is stored at the output resolution unless asked: the largest maps live there.
            store = keep_full_resolution or x.height < out_height
            x = _resnet(resnet, x, band_rows, store)
        for up in block.upsamplers or []:
            x = _upsampled(up, x)
    if not isinstance(decoder.conv_act, torch.nn.SiLU):
        raise UnsupportedVAEError("the decoder's output activation is not SiLU")
    final = _Conv(decoder.conv_out, _norm_silu(decoder.conv_norm_out, x, band_rows))
    out = torch.empty(final.batch, final.channels, final.height, final.width, dtype=torch.float32, device=latents.device)
    for a, b in _bands(final.height, band_rows or default_band_rows(final.height)):
        out[:, :, a:b] = final.rows(a, b)
    return out


@torch.no_grad()
def exact_encode(
    vae: AutoencoderKL, pixels: torch.Tensor, band_rows: int | None = None, keep_full_resolution: bool = False
) -> DiagonalGaussianDistribution:
    """The posterior ``vae.encode(pixels).latent_dist`` for images (B, 3, H, W) in [-1, 1], computed
    band by band (equal up to float rounding, in a fraction of the memory); ``keep_full_resolution``
    as for :func:`exact_decode`."""
    encoder = vae.encoder
    x: _Node = _Conv(encoder.conv_in, _Stored(pixels))
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            store = keep_full_resolution or x.height < pixels.shape[2]
            x = _resnet(resnet, x, band_rows, store)
        for down in block.downsamplers or []:
            x = _downsampled(down, x)
    if not isinstance(x, _Stored):
        x = _materialise(x, band_rows)
    h = encoder.mid_block(x.tensor)  # latent resolution from here on: run whole
    del x
    h = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(h)))
    if vae.config.use_quant_conv:
        h = vae.quant_conv(h)
    return DiagonalGaussianDistribution(h)
