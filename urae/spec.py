"""Plain domain objects: what to generate, with which adapters. HTTP schemas wrap these."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from urae.errors import InvalidSpecError

# Documented bounds. The pixel limit is 4096 x 4160 = 17,039,360: 4096 x 4096 plus 64 rows, because
# the 4K preset's other aspect ratios, rounded to multiples of 16, go slightly above 4096^2 (4:3 is
# 4736 x 3552 = 16,822,272). Any width x height up to that product is accepted; a side may reach MAX_SIDE.
SIZE_MULTIPLE = 16
MIN_SIDE = 64
MAX_SIDE = 8192
MAX_PIXELS = 4096 * 4160
# How every message and document states the limit.
PIXEL_LIMIT_TEXT = f"{MAX_PIXELS:,} pixels (width x height; 4096x4160 is the largest with a 4096 side)"


def pixel_limit_error(width: int, height: int) -> str:
    """The message for a size above MAX_PIXELS, the same in the library, the API and the docs."""
    return f"{width}x{height} is {width * height:,} pixels; the maximum is {PIXEL_LIMIT_TEXT}"
MAX_STEPS = 100
MAX_GUIDANCE = 30.0
MAX_PROMPT_CHARS = 2000
MAX_IMAGES = 4
MAX_NTK_FACTOR = 100.0
MAX_SEQUENCE_LENGTHS = (64, 128, 256, 512)
VAE_DECODE_MODES = ("auto", "full", "exact", "tiled", "patched")
TIERS = ("quality", "fast", "turbo")
MAX_SEED = 2**63 - 1
# Image to image: the share of the schedule that is run again over the input image (1: from noise, the
# input only sets the size). Chosen from the refine measurements in BENCHMARKS.md.
DEFAULT_STRENGTH = 0.45
# The largest input image read (width x height, before it is fitted to the output size): 8192 x 8192.
MAX_INPUT_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class AdapterRef:
    """An adapter by name with its blend weight (0 leaves the base model's output unchanged)."""

    name: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        """Parse ``name`` or ``name:weight`` (the CLI form)."""
        name, sep, weight = text.rpartition(":")
        if not sep or not _is_float(weight):
            return cls(text)
        return cls(name, float(weight))


@dataclass
class GenerationSpec:
    """Everything that determines an image. Build one with :func:`urae.presets.resolve_spec`."""

    prompt: str
    width: int = 1024
    height: int = 1024
    steps: int = 28
    guidance: float = 3.5
    seed: int = 0
    num_images: int = 1
    max_sequence_length: int = 512
    # RoPE NTK: rotary theta is multiplied by this factor (URAE uses 10 at 2K and 4K).
    ntk_factor: float = 1.0
    # Softmax scale sqrt(log_4608(N) / head_dim) instead of 1/sqrt(head_dim).
    proportional_attention: bool = False
    # None: the model's own scheduler config (dev: dynamic shift; schnell: static 1.0); a number: that
    # static shift (the 2K/4K presets: the model's own value, dev 3.0, schnell 1.0).
    shift: float | None = None
    vae_decode: str = "auto"
    adapters: tuple[AdapterRef, ...] = ()
    preset: str | None = None
    # Speed tier (urae.tiers): quality, fast (fp8) or turbo (step cache).
    tier: str = "quality"
    # Image to image: how much of the schedule is run over the input image (see DEFAULT_STRENGTH).
    # None without an input image.
    strength: float | None = None

    def validate(self) -> GenerationSpec:
        """Raise :class:`InvalidSpecError` naming the first bad field; return self when valid."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidSpecError("prompt", "must be a non-empty string")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise InvalidSpecError(
                "prompt", f"is {len(self.prompt)} characters; the maximum is {MAX_PROMPT_CHARS}"
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidSpecError(name, f"must be an integer, got {value!r}")
            if value % SIZE_MULTIPLE:
                raise InvalidSpecError(name, f"{value} is not a multiple of {SIZE_MULTIPLE}")
            if not MIN_SIDE <= value <= MAX_SIDE:
                raise InvalidSpecError(name, f"{value} is outside {MIN_SIDE}..{MAX_SIDE}")
        if self.width * self.height > MAX_PIXELS:
            raise InvalidSpecError(
                "width", pixel_limit_error(self.width, self.height)
            )
        _check_int("steps", self.steps, 1, MAX_STEPS)
        _check_int("num_images", self.num_images, 1, MAX_IMAGES)
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_float("guidance", self.guidance, 0.0, MAX_GUIDANCE)
        _check_float("ntk_factor", self.ntk_factor, 1.0, MAX_NTK_FACTOR)
        if self.shift is not None:
            _check_float("shift", self.shift, 0.1, 100.0)
        if self.max_sequence_length not in MAX_SEQUENCE_LENGTHS:
            raise InvalidSpecError(
                "max_sequence_length", f"{self.max_sequence_length} is not one of {MAX_SEQUENCE_LENGTHS}"
            )
        if self.vae_decode not in VAE_DECODE_MODES:
            raise InvalidSpecError("vae_decode", f"{self.vae_decode!r} is not one of {VAE_DECODE_MODES}")
        if self.tier not in TIERS:
            raise InvalidSpecError("tier", f"{self.tier!r} is not one of {', '.join(TIERS)}")
        if self.strength is not None:
            if isinstance(self.strength, bool) or not isinstance(self.strength, int | float) or not (
                    math.isfinite(self.strength) and 0 < self.strength <= 1):
                raise InvalidSpecError("strength", f"must be a number in (0, 1], got {self.strength!r}")
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise InvalidSpecError("adapters", "an adapter is listed twice")
        for ref in self.adapters:
            if not ref.name:
                raise InvalidSpecError("adapters", "an adapter name is empty")
            _check_float("adapters", ref.weight, -4.0, 4.0)
        return self

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["adapters"] = [asdict(a) for a in self.adapters]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationSpec:
        data = dict(data)
        data["adapters"] = tuple(AdapterRef(**a) for a in data.get("adapters", ()))
        return cls(**data)

    def steps_run(self) -> int:
        """The denoising steps this spec runs: all of them from noise; from an input image, the last
        ``strength`` share of the schedule (at least one)."""
        return self.steps - self.skipped_steps()

    def skipped_steps(self) -> int:
        """The schedule's first steps an image-to-image run skips (its input stands in for them)."""
        if self.strength is None:
            return 0
        return int(max(self.steps - min(self.steps * self.strength, self.steps), 0))

    @property
    def image_tokens(self) -> int:
        """Number of image tokens: one per 16x16 pixel patch (8x VAE, 2x2 packing)."""
        return (self.width // 16) * (self.height // 16)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidSpecError(name, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidSpecError(name, f"{value} is outside {low}..{high}")


def _check_float(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidSpecError(name, f"must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise InvalidSpecError(name, f"{value} is outside {low}..{high}")


__all__ = ["DEFAULT_STRENGTH", "AdapterRef", "GenerationSpec", "field"]
