"""Resolution presets: ONE table of data. A request's size picks a row; every field can be overridden."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from urae.errors import InvalidSpecError
from urae.spec import SIZE_MULTIPLE, AdapterRef, GenerationSpec


@dataclass(frozen=True)
class Preset:
    name: str
    long_side: int  # the side of the square image; other aspect ratios keep its pixel count
    adapter: str | None  # built-in adapter name (see urae.adapters.builtin)
    ntk_factor: float
    proportional_attention: bool
    shift: float | None  # None: the model's own scheduler config; a number: that static shift
    steps: int
    guidance: float
    max_sequence_length: int
    vae_decode: str


# URAE's inference settings (URAE.md). Above the trained length (1024 px) the dynamic shift
# extrapolates to mu ~ 11.5 at 4096 px and the image never denoises: 2K and 4K run a static shift
# with the MODEL'S OWN shift value, as the reference does (its scheduler keeps config.shift with
# dynamic shifting off): 3.0 for dev, 1.0 for schnell (4 steps: sigmas 1, .75, .5, .25).
# schnell: 4 steps, no guidance, 256 T5 tokens; at 1K both models run their stock scheduler.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("1k", 1024, None, 1.0, False, None, 28, 3.5, 512, "full"),
        Preset("2k", 2048, "urae-2k", 10.0, True, 3.0, 28, 3.5, 512, "auto"),
        Preset("4k", 4096, "urae-4k", 10.0, True, 3.0, 28, 3.5, 512, "auto"),
        Preset("1k-schnell", 1024, None, 1.0, False, None, 4, 0.0, 256, "full"),
        Preset("2k-schnell", 2048, "urae-2k", 10.0, True, 1.0, 4, 0.0, 256, "auto"),
        Preset("4k-schnell", 4096, "urae-4k-schnell", 10.0, True, 1.0, 4, 0.0, 256, "auto"),
        # mini (urae.mini) at its own scale: its base resolution (128 px, the analogue of 1024 px) and
        # 2x / 4x of it, with mini's own URAE adapters; 64 T5 tokens, the length it was trained with;
        # 20 steps (a CPU draws its base size in about a second).
        Preset("1k-mini", 128, None, 1.0, False, None, 20, 3.5, 64, "full"),
        Preset("2k-mini", 256, "urae-2k", 10.0, True, 3.0, 20, 3.5, 64, "auto"),
        Preset("4k-mini", 512, "urae-4k", 10.0, True, 3.0, 20, 3.5, 64, "auto"),
    ]
}
# Models whose presets are their own rows (``{size}-{family}``), scaled to their training size.
PRESET_FAMILIES = {"mini": "mini"}

ASPECT_RATIOS = ("1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "2:1", "1:2", "4:1", "1:4")


def preset_name(size: str, schnell: bool, model: str | None = None) -> str:
    """``1k``/``2k``/``4k`` for a dev-like model, the ``-schnell`` row for a schnell-like one, and the
    model's own row for a model with its own scale (``mini``: ``1k-mini`` is 128 px)."""
    key = size.lower()
    for suffix in ("-schnell", *(f"-{f}" for f in PRESET_FAMILIES.values())):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    if key not in ("1k", "2k", "4k"):
        raise InvalidSpecError("preset", f"{size!r} is not one of 1k, 2k, 4k")
    if model in PRESET_FAMILIES:
        return f"{key}-{PRESET_FAMILIES[model]}"
    return f"{key}-schnell" if schnell else key


def size_for_aspect(long_side: int, aspect_ratio: str) -> tuple[int, int]:
    """Width and height (multiples of 16) with about ``long_side**2`` pixels at ``aspect_ratio``."""
    try:
        w_part, h_part = (float(x) for x in aspect_ratio.split(":"))
    except ValueError:
        raise InvalidSpecError("aspect_ratio", f"{aspect_ratio!r} is not of the form W:H") from None
    if not (w_part > 0 and h_part > 0) or max(w_part / h_part, h_part / w_part) > 4:
        raise InvalidSpecError("aspect_ratio", f"{aspect_ratio!r} must be positive and at most 4:1")
    area = long_side * long_side
    ratio = w_part / h_part
    width = math.sqrt(area * ratio)
    height = math.sqrt(area / ratio)
    return _round16(width), _round16(height)


def _round16(x: float) -> int:
    return max(SIZE_MULTIPLE, int(round(x / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


def resolve_spec(
    prompt: str,
    preset: str = "1k",
    *,
    schnell: bool = False,
    aspect_ratio: str = "1:1",
    preset_adapter: bool = True,
    adapters: tuple[AdapterRef, ...] | list[AdapterRef] = (),
    model: str | None = None,
    **overrides: Any,
) -> GenerationSpec:
    """Build a validated spec from a preset row plus per-request overrides.

    ``overrides`` are GenerationSpec fields (width, height, steps, guidance, seed, ...); a value of
    None means "use the preset's". The preset's adapter comes first unless ``preset_adapter`` is False.
    ``model``: the model id, for models with presets of their own scale (see :data:`PRESET_FAMILIES`).
    """
    row = PRESETS[preset_name(preset, schnell, model)]
    width, height = size_for_aspect(row.long_side, aspect_ratio)
    refs: list[AdapterRef] = []
    if preset_adapter and row.adapter is not None:
        refs.append(AdapterRef(row.adapter, 1.0))
    refs.extend(a for a in adapters if a.name not in {r.name for r in refs})
    spec = GenerationSpec(
        prompt=prompt,
        width=width,
        height=height,
        steps=row.steps,
        guidance=row.guidance,
        max_sequence_length=row.max_sequence_length,
        ntk_factor=row.ntk_factor,
        proportional_attention=row.proportional_attention,
        shift=row.shift,
        vae_decode=row.vae_decode,
        adapters=tuple(refs),
        preset=row.name,
    )
    known = set(GenerationSpec.__dataclass_fields__)
    unknown = set(overrides) - known
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidSpecError(name, "is not a generation parameter")
    spec = replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    return spec.validate()
