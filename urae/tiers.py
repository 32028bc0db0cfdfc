"""Speed tiers: what a generation trades for speed.

- ``quality``: the model's own precision (bf16 on GPUs), the best attention kernel, compiled blocks.
- ``fast``: + fp8 (torchao float8 dynamic activations and weights, per-row scales) on the
  transformer's linear layers, the adapter slots in full precision on top, and 8-bit attention where
  it serves (below). Needs a GPU with compute capability >= 8.9 (Ada, Hopper or newer).
- ``turbo``: + a step cache (diffusers' First Block Cache): when the first block's output changed
  little since the last fully computed step, the other blocks' residual is reused. Threshold per
  preset. On a worker that holds fp8 weights, turbo runs on them.

One worker holds one set of weights: it serves ``quality`` and ``turbo`` in bf16, or ``fast`` and
``turbo`` in fp8 (two copies of the transformer would not fit the 4K memory budget). Under a memory
profile that stores the weights in 8 bits (``24gb``, see urae.memory_profile) every tier runs on
those weights, so one load serves all three.

``fast`` also runs attention in 8 bits (sageattention's INT8 Q/K kernel, ``urae.attention``) where
the kernel works on the GPU at FLUX's shape, stays within 5 % of the exact kernel's output, is faster
than it and honours URAE's scale (checked at load); elsewhere it runs the exact kernel and says why
in the worker's capabilities (``notes``). The other tiers of the same load run the exact
kernel: the switch is a value read per request, not another compiled graph.

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
from urae.memory_profile import (
    FLOAT8,
    MemoryPlan,
    offload_text_encoders,
    plan_memory,
    quantize_block_linears,
    quantize_for_plan,
)
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


def resolve_served_tiers(
    requested: Iterable[str] | None, device: torch.device | str, quantized_weights: bool = False
) -> tuple[str, ...]:
    """The tiers one model load serves: ``requested`` (default quality and turbo), checked.

    Raises :class:`TierUnavailableError` for fast on a device without fp8, and for quality together
    with fast (one load holds either bf16 or fp8 weights) unless a memory profile already stores the
    weights in 8 bits (``quantized_weights``).
    """
    tiers = tuple(dict.fromkeys(check_tier(t) for t in (requested or ("quality", "turbo"))))
    if not tiers:
        raise InvalidSpecError("tier", "no tier to serve")
    if "fast" in tiers:
        reason = fp8_unavailable_reason(device)
        if reason is not None:
            raise TierUnavailableError(reason)
        if "quality" in tiers and not quantized_weights:
            raise TierUnavailableError(
                "quality and fast need different weights (bf16, fp8): serve them from different workers"
            )
    return tiers


def quantize_fp8(transformer: torch.nn.Module) -> int:
    """fp8 dynamic activations and weights (per-row) on the blocks' linear layers, in place.

    The LoRA slots (lora_A/lora_B) and the embedders stay in full precision. Returns how many layers
    were quantized. torchao's inductor settings are left alone (see
    :func:`urae.memory_profile.quantization_config`).
    """
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise TierUnavailableError("the fast tier needs torchao: install urae-serve[gpu]") from exc
    return quantize_block_linears(transformer, FLOAT8)


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


IDLE_SLOT_MODES = ("compute", "skip")


@dataclass
class SpeedSetup:
    """How one loaded generator runs: tiers served, attention kernels, precision, compiled blocks,
    memory profile, and what fell back (``notes``)."""

    tiers: tuple[str, ...]
    attention_backend: str
    precision: str
    compiled_blocks: int
    step_cache: StepCache
    fast_refusal: str = ""  # why fast is not served, when it is not
    # Turbo's First Block Cache threshold per preset (a copy of TURBO_THRESHOLDS, tunable per load).
    thresholds: dict[str, float] = field(default_factory=lambda: dict(TURBO_THRESHOLDS))
    memory: MemoryPlan = field(default_factory=lambda: plan_memory("default", "cpu"))
    # The attention kernel the fast tier runs: urae.attention.INT8_BACKEND, or the exact one.
    fast_attention: str = ""
    # Requests without adapters skip the adapter slots ("skip") or compute them at weight 0 ("compute").
    idle_slots: str = "compute"
    # What an optional part did instead of failing: "fast attention: ...", "weights: ...", "compile: ...".
    notes: list[str] = field(default_factory=list)
    _slots_enabled: bool = True

    def threshold(self, preset: str | None) -> float:
        return self.thresholds.get(preset or "", DEFAULT_TURBO_THRESHOLD)

    @classmethod
    def apply(
        cls, generator: Any, tiers: Iterable[str] | None, compile: bool | str | None, attention_backend: str,
        memory_profile: str = "default", idle_slots: str = "compute",
    ) -> SpeedSetup:
        """Prepare ``generator``'s transformer once, at load, in the only order that keeps it stable.

        Proportional-attention processors are installed first (the backend is then set on them),
        adapter slots are created before quantizing and compiling (so neither sees a new layer later),
        the weights are quantized (memory profile, or fp8 for fast) and the blocks compiled last.
        ``compile`` None: on CUDA only; a string: that torch.compile backend. ``idle_slots``: see
        :data:`IDLE_SLOT_MODES` and :meth:`use_adapter_slots`.
        """
        from urae.attention import BASE_SEQUENCE_LENGTH, set_proportional_attention
        from urae.models import choose_attention_backend, compile_blocks

        if idle_slots not in IDLE_SLOT_MODES:
            raise InvalidSpecError("idle_adapter_slots", f"{idle_slots!r} is not one of {', '.join(IDLE_SLOT_MODES)}")
        transformer = generator.pipe.transformer
        device = torch.device(generator.device)
        if compile is None:
            # Not under accelerate's CPU offload: its hooks move weights inside the blocks' calls.
            offloaded = any(hasattr(m, "_hf_hook") for m in transformer.modules())
            compile = device.type == "cuda" and not offloaded
        plan = plan_memory(memory_profile, device, compiled=bool(compile))
        served = resolve_served_tiers(tiers, device, quantized_weights=plan.weights is not None)
        notes: list[str] = []
        if plan.text_encoders_off_gpu:
            notes += [f"text encoders: {note}" for note in offload_text_encoders(generator.pipe, device)]
        # Installs the processors and their shared scale tensor (1.0: the stock scale).
        set_proportional_attention(transformer, False, num_tokens=BASE_SEQUENCE_LENGTH)
        backend = choose_attention_backend(transformer, device, attention_backend)
        precision = str(next(transformer.parameters()).dtype).removeprefix("torch.")
        if compile or "fast" in served or plan.weights is not None or idle_slots == "skip":
            generator.adapters  # noqa: B018 - the fixed adapter slots, before quantizing and compiling
        if plan.weights is not None:
            precision, note = quantize_for_plan(transformer, plan, device)
            if note:
                notes.append(f"weights: {note}")
        elif "fast" in served:
            quantize_fp8(transformer)
            precision = FLOAT8
        fast_attention = ""
        if "fast" in served:
            fast_attention, note = _fast_attention(transformer, device, backend)
            if note:
                notes.append(f"fast attention: {note}")
        compiled = 0
        if compile:
            compiled = compile_blocks(transformer, compile if isinstance(compile, str) else "inductor")
        refusal = ""
        if "fast" not in served:
            refusal = fp8_unavailable_reason(device) or "this model load holds bf16 weights; fast runs on a load serving fast"
        return cls(served, backend, precision, compiled, StepCache(transformer), refusal, memory=plan,
                   fast_attention=fast_attention, idle_slots=idle_slots, notes=notes)

    def check_tier(self, tier: str) -> None:
        check_tier(tier)
        if tier not in self.tiers:
            why = f": {self.fast_refusal}" if tier == "fast" else ""
            raise TierUnavailableError(f"{tier} is not served here (served: {', '.join(self.tiers)}){why}")

    def set_tier(self, tier: str, preset: str | None) -> None:
        """Step cache on for turbo (the preset's threshold), off otherwise; state of a previous run
        cleared; the 8-bit attention kernel on for fast only (where this load has it)."""
        from urae.attention import INT8_ATTENTION, INT8_BACKEND

        if tier == "turbo":
            self.step_cache.enable(self.threshold(preset))
            # A canceled run leaves the cached residuals behind; never reuse them across requests.
            self.step_cache.transformer._reset_stateful_cache()
        else:
            self.step_cache.disable()
        if self.fast_attention == INT8_BACKEND:
            INT8_ATTENTION.select(int8=tier == "fast", exact_backend=self.attention_backend)

    def attention_for(self, tier: str) -> str:
        """The attention kernel a request of ``tier`` runs."""
        return self.fast_attention if tier == "fast" and self.fast_attention else self.attention_backend

    def use_adapter_slots(self, transformer: Any, needed: bool) -> None:
        """With ``idle_slots="skip"``, switch the adapter slots off for a request without adapters.

        peft's per-layer switch is read by the compiled blocks as a guard: both states compile once
        (a worker's warm-up runs the 1K preset without an adapter and 2K with one), and switching
        between them afterwards never compiles.
        """
        if self.idle_slots != "skip" or needed == self._slots_enabled:
            return
        from peft.tuners.lora import LoraLayer

        for module in transformer.modules():
            if isinstance(module, LoraLayer):
                module.enable_adapters(needed)
        self._slots_enabled = needed

    def exact_attention_only(self, transformer: Any, reason: str) -> None:
        """The fast tier runs the exact kernel too (e.g. context parallelism: the 8-bit kernel does not
        return the log-sum-exp ring attention needs)."""
        from urae.attention import INT8_BACKEND

        if self.fast_attention != INT8_BACKEND:
            return
        for module in transformer.modules():
            processor = getattr(module, "processor", None)
            if processor is not None and hasattr(processor, "_attention_backend"):
                processor._attention_backend = self.attention_backend
        self.fast_attention = self.attention_backend
        self.notes.append(f"fast attention: {reason}; exact kernel")

    def fall_back_to_eager(self, transformer: Any, reason: str) -> None:
        """Undo :func:`urae.models.compile_blocks` after a compile failure: the blocks run eagerly."""
        self.step_cache.disable()
        for module in transformer.modules():
            if hasattr(module.__dict__.get("forward"), "_torchdynamo_orig_callable"):
                del module.forward
        self.compiled_blocks = 0
        self.notes.append(f"compile: {reason}; the blocks run eagerly")

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "tiers": list(self.tiers),
            "attention_backend": self.attention_backend,
            "precision": self.precision,
            "compiled": self.compiled_blocks > 0,
            "memory_profile": self.memory.profile,
        }
        if "fast" in self.tiers:
            described["fast_attention"] = self.fast_attention
        if self.notes:
            described["notes"] = list(self.notes)
        return described

    def metadata(self, tier: str, preset: str | None) -> dict[str, Any]:
        cache = {"kind": "first_block", "threshold": self.threshold(preset)} if tier == "turbo" else None
        return {
            "attention_backend": self.attention_for(tier),
            "precision": self.precision,
            "compiled": self.compiled_blocks > 0,
            "step_cache": cache,
            "memory_profile": self.memory.profile,
        }


def _fast_attention(transformer: Any, device: torch.device, exact_backend: str) -> tuple[str, str]:
    """(the attention backend the fast tier runs, why not the 8-bit one when it is not)."""
    import logging

    from urae.attention import INT8_BACKEND, int8_attention_problem

    problem = int8_attention_problem(device, exact_backend)
    if problem is not None:
        return exact_backend, problem
    # diffusers logs a warning on every call that attention backends are experimental.
    diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
    level = diffusers_log.level
    diffusers_log.setLevel(logging.ERROR)
    try:
        transformer.set_attention_backend(INT8_BACKEND)
    finally:
        diffusers_log.setLevel(level)
    return INT8_BACKEND, ""


WARMUP_MODES = ("none", "presets", "full")


def warmup_specs(
    mode: str, schnell: bool, tiers: Iterable[str], max_pixels: int, model: str | None = None
) -> list[GenerationSpec]:
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
                spec = resolve_spec("warm-up", size, schnell=schnell, aspect_ratio=ratio, tier=tier, model=model)
                if spec.width * spec.height <= max_pixels:
                    specs.append(spec)
    return specs
