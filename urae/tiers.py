"""Speed tiers: what a generation trades for speed.

- ``quality``: the model's own precision (bf16 on GPUs), the best attention kernel, compiled blocks.
- ``fast``: + fp8 (torchao float8 dynamic activations and weights, per-row scales) on the
  transformer's linear layers; the adapter slots stay in full precision on top. Needs a GPU with
  compute capability >= 8.9 (Ada, Hopper or newer).
- ``turbo``: + a step cache (diffusers' First Block Cache): when the first block's output changed
  little since the last fully computed step, the other blocks' residual is reused. Threshold per
  preset. On a worker that holds fp8 weights, turbo runs on them.

One worker holds one set of weights: it serves ``quality`` and ``turbo`` in bf16, or ``fast`` and
``turbo`` in fp8 (two copies of the transformer would not fit the 4K memory budget).

Why First Block Cache among diffusers 0.42's step caches: it decides per step from the model's own
output (a step is reused only when the first block's residual barely moved), so it adapts to any
adapter, preset and step count. MagCache needs magnitude ratios calibrated per model and schedule
(FLUX_MAG_RATIOS are for the stock 1K model, not for URAE's adapters at 2K/4K); TaylorSeer skips on
a fixed interval whatever the model does. Which keeps URAE's 4K detail best needs real weights on a
GPU (bench/device_check.sh saves the tiers' images side by side).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from urae.errors import InvalidSpecError, TierUnavailableError
from urae.spec import TIERS, GenerationSpec

DEFAULT_TIER = "quality"
FP8_MIN_CAPABILITY = (8, 9)

# First Block Cache threshold (relative change of the first block's residual below which the rest of
# the step is reused) per preset. Higher resolutions keep a lower one: URAE's 4K detail lives in the
# late, small updates that a cached residual would smooth away. schnell's 4 steps leave little to skip.
TURBO_THRESHOLDS = {
    "1k": 0.12,
    "2k": 0.10,
    "4k": 0.08,
    "1k-schnell": 0.05,
    "2k-schnell": 0.05,
    "4k-schnell": 0.05,
}
DEFAULT_TURBO_THRESHOLD = 0.08


def check_tier(tier: str) -> str:
    if tier not in TIERS:
        raise InvalidSpecError("tier", f"{tier!r} is not one of {', '.join(TIERS)}")
    return tier


def fp8_unavailable_reason(device: torch.device | str) -> str | None:
    """Why this device cannot run the ``fast`` tier, or None when it can."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"the fast tier needs fp8 on a CUDA GPU with compute capability >= 8.9; this device is {device}"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        return (
            f"the fast tier needs fp8 (compute capability >= 8.9); "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}"
        )
    try:
        import torchao  # noqa: F401
    except ImportError:
        return "the fast tier needs torchao: install urae-serve[gpu]"
    return None


def supported_tiers(device: torch.device | str) -> tuple[str, ...]:
    """Every tier this device can run (fast only where fp8 is available)."""
    if fp8_unavailable_reason(device) is None:
        return TIERS
    return ("quality", "turbo")


def resolve_served_tiers(requested: Iterable[str] | None, device: torch.device | str) -> tuple[str, ...]:
    """The tiers one model load serves: ``requested`` (default quality and turbo), checked.

    Raises :class:`TierUnavailableError` for fast on a device without fp8, and for quality together
    with fast (one load holds either bf16 or fp8 weights).
    """
    tiers = tuple(dict.fromkeys(check_tier(t) for t in (requested or ("quality", "turbo"))))
    if not tiers:
        raise InvalidSpecError("tier", "no tier to serve")
    if "fast" in tiers:
        reason = fp8_unavailable_reason(device)
        if reason is not None:
            raise TierUnavailableError(reason)
        if "quality" in tiers:
            raise TierUnavailableError(
                "quality and fast need different weights (bf16, fp8): serve them from different workers"
            )
    return tiers


def quantize_fp8(transformer: torch.nn.Module) -> int:
    """fp8 dynamic activations and weights (per-row) on the blocks' linear layers, in place.

    The LoRA slots (lora_A/lora_B) and the embedders stay in full precision. Returns how many layers
    were quantized.
    """
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise TierUnavailableError("the fast tier needs torchao: install urae-serve[gpu]") from exc
    count = 0

    def is_block_linear(module: torch.nn.Module, fqn: str) -> bool:
        nonlocal count
        chosen = (
            isinstance(module, torch.nn.Linear)
            and "transformer_blocks." in fqn
            and ".lora_" not in fqn
        )
        count += chosen
        return chosen

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=is_block_linear)
    return count


@dataclass
class StepCache:
    """diffusers' First Block Cache on one transformer, switched per request.

    The hooks wrap each block's forward from the outside; compiled block code (see
    :func:`urae.models.compile_blocks`) sits under them unchanged, so switching never recompiles.
    """

    transformer: Any
    threshold: float | None = None

    def enable(self, threshold: float) -> None:
        from diffusers.hooks import FirstBlockCacheConfig

        if self.threshold == threshold:
            return
        self.disable()
        self.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        self.threshold = threshold

    def disable(self) -> None:
        if self.threshold is not None:
            self.transformer.disable_cache()
            self.threshold = None


@dataclass
class SpeedSetup:
    """How one loaded generator runs: tiers served, attention kernel, precision, compiled blocks."""

    tiers: tuple[str, ...]
    attention_backend: str
    precision: str
    compiled_blocks: int
    step_cache: StepCache
    fast_refusal: str = ""  # why fast is not served, when it is not
    # Turbo's First Block Cache threshold per preset (a copy of TURBO_THRESHOLDS, tunable per load).
    thresholds: dict[str, float] = field(default_factory=lambda: dict(TURBO_THRESHOLDS))

    def threshold(self, preset: str | None) -> float:
        return self.thresholds.get(preset or "", DEFAULT_TURBO_THRESHOLD)

    @classmethod
    def apply(
        cls, generator: Any, tiers: Iterable[str] | None, compile: bool | str | None, attention_backend: str
    ) -> SpeedSetup:
        """Prepare ``generator``'s transformer once, at load, in the only order that keeps it stable.

        Proportional-attention processors are installed first (the backend is then set on them),
        adapter slots are created before fp8 and compilation (so neither sees a new layer later), and
        the blocks are compiled last. ``compile`` None: on CUDA only; a string: that torch.compile
        backend.
        """
        from urae.attention import BASE_SEQUENCE_LENGTH, set_proportional_attention
        from urae.models import choose_attention_backend, compile_blocks

        transformer = generator.pipe.transformer
        device = torch.device(generator.device)
        served = resolve_served_tiers(tiers, device)
        # Installs the processors and their shared scale tensor (1.0: the stock scale).
        set_proportional_attention(transformer, False, num_tokens=BASE_SEQUENCE_LENGTH)
        backend = choose_attention_backend(transformer, device, attention_backend)
        if compile is None:
            # Not under accelerate's CPU offload: its hooks move weights inside the blocks' calls.
            offloaded = any(hasattr(m, "_hf_hook") for m in transformer.modules())
            compile = device.type == "cuda" and not offloaded
        precision = str(next(transformer.parameters()).dtype).removeprefix("torch.")
        if compile or "fast" in served:
            generator.adapters  # noqa: B018 - the fixed adapter slots, before quantizing and compiling
        if "fast" in served:
            quantize_fp8(transformer)
            precision = "float8"
        compiled = 0
        if compile:
            compiled = compile_blocks(transformer, compile if isinstance(compile, str) else "inductor")
        refusal = ""
        if "fast" not in served:
            refusal = fp8_unavailable_reason(device) or "this model load holds bf16 weights; fast runs on a load serving fast"
        return cls(served, backend, precision, compiled, StepCache(transformer), refusal)

    def check_tier(self, tier: str) -> None:
        check_tier(tier)
        if tier not in self.tiers:
            why = f": {self.fast_refusal}" if tier == "fast" else ""
            raise TierUnavailableError(f"{tier} is not served here (served: {', '.join(self.tiers)}){why}")

    def set_tier(self, tier: str, preset: str | None) -> None:
        """Step cache on for turbo (the preset's threshold), off otherwise; state of a previous run cleared."""
        if tier == "turbo":
            self.step_cache.enable(self.threshold(preset))
            # A canceled run leaves the cached residuals behind; never reuse them across requests.
            self.step_cache.transformer._reset_stateful_cache()
        else:
            self.step_cache.disable()

    def describe(self) -> dict[str, Any]:
        return {
            "tiers": list(self.tiers),
            "attention_backend": self.attention_backend,
            "precision": self.precision,
            "compiled": self.compiled_blocks > 0,
        }

    def metadata(self, tier: str, preset: str | None) -> dict[str, Any]:
        cache = {"kind": "first_block", "threshold": self.threshold(preset)} if tier == "turbo" else None
        return {
            "attention_backend": self.attention_backend,
            "precision": self.precision,
            "compiled": self.compiled_blocks > 0,
            "step_cache": cache,
        }


WARMUP_MODES = ("none", "presets", "full")


def warmup_specs(mode: str, schnell: bool, tiers: Iterable[str], max_pixels: int) -> list[GenerationSpec]:
    """What a worker runs before it reports ready: every served (preset, aspect ratio, tier).

    ``presets``: each preset at 1:1; ``full``: at every aspect ratio; ``none``: nothing. Sizes above
    ``max_pixels`` (what the worker serves) are left out. Each preset brings its URAE adapter, so the
    built-in adapters are fetched and cached too.
    """
    from urae.presets import ASPECT_RATIOS, resolve_spec

    if mode not in WARMUP_MODES:
        raise InvalidSpecError("warmup", f"{mode!r} is not one of {', '.join(WARMUP_MODES)}")
    if mode == "none":
        return []
    ratios = ASPECT_RATIOS if mode == "full" else ("1:1",)
    specs = []
    for size in ("1k", "2k", "4k"):
        for ratio in ratios:
            for tier in tiers:
                spec = resolve_spec("warm-up", size, schnell=schnell, aspect_ratio=ratio, tier=tier)
                if spec.width * spec.height <= max_pixels:
                    specs.append(spec)
    return specs
