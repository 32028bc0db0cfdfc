"""Memory profiles: how a generation worker fits FLUX.1 into its GPU's memory.

- ``default``: the transformer in the load's dtype (bf16: 23.8 GB of weights), T5-XXL off the GPU
  between prompts (``URAE_TEXT_ENCODER_OFFLOAD``), the full VAE decode up to 2K. For 40 GB+ GPUs.
- ``24gb``: 2K and 4K on a 24 GB GPU (L4, A10G, RTX 4090):

  - the linear weights of the transformer blocks in 8 bits, quantized one layer at a time on their
    way to the GPU (the bf16 transformer is never on the GPU whole): fp8 (torchao float8 dynamic
    activations and weights, per row) on GPUs of compute capability >= 8.9 when the blocks are
    compiled, else int8 weight-only (per row; Ampere). Uncompiled, fp8's activation scaling holds
    float32 copies of a layer's input: counted on the real architecture at 4K, a step's tensors grow
    from 6.5 GiB to 17.3 GiB, past the budget; compiled, inductor fuses them into one pass. The adapter
    slots stay in the load's dtype, so adapters are still hot-swapped;
  - both text encoders (CLIP-L and T5-XXL) in CPU memory, streamed onto the GPU while a prompt is
    encoded (diffusers' group offloading);
  - the exact banded VAE decode above 1K (2K included; ``urae.vae_exact``).

``bench/memory_accounting.py`` counts what this keeps on the GPU at 2K and 4K on the real
architecture (meta tensors); ``bench/device_check.sh`` part 2 measures it under a 24 GB cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from urae.errors import InvalidSpecError, ModelLoadError

MEMORY_PROFILES = ("default", "24gb")
FLOAT8 = "float8"
INT8_WEIGHT_ONLY = "int8_weight_only"
FP8_MIN_CAPABILITY = (8, 9)
# What "24gb" is designed for: the memory of an L4, A10G or RTX 4090 (24 GB; 22.5 GiB visible on an
# L4 or A10G, less the CUDA context).
PROFILE_BUDGET_BYTES = {"24gb": 24 * 10**9}
# Above this many pixels the 24gb profile decodes band by band (exactly): 2K's plain decode holds
# ~6 GB of feature maps in bf16, more than its budget leaves after the weights.
BANDED_DECODE_ABOVE_PIXELS = int(1024 * 1024 * 1.02)


@dataclass(frozen=True)
class MemoryPlan:
    """What a profile does on one device."""

    profile: str
    weights: str | None  # None: the load's dtype; FLOAT8 or INT8_WEIGHT_ONLY
    text_encoders_off_gpu: bool
    full_decode_max_pixels: int | None  # None: the decoder's own choice (urae.vae_decode)

    @property
    def budget_bytes(self) -> int | None:
        return PROFILE_BUDGET_BYTES.get(self.profile)

    def decode_mode(self, requested: str, height: int, width: int) -> str:
        """``auto`` becomes ``exact`` above this profile's full-decode size; other modes are kept."""
        if requested == "auto" and self.full_decode_max_pixels is not None and height * width > self.full_decode_max_pixels:
            return "exact"
        return requested


def check_profile(profile: str) -> str:
    if profile not in MEMORY_PROFILES:
        raise InvalidSpecError("memory_profile", f"{profile!r} is not one of {', '.join(MEMORY_PROFILES)}")
    return profile


def weight_format(device: torch.device | str, compiled: bool = True) -> str:
    """fp8 where the GPU computes in fp8 (compute capability >= 8.9) and the blocks are compiled,
    else int8 weight-only (see the module's docstring for why compiling matters)."""
    device = torch.device(device)
    if compiled and device.type == "cuda" and torch.cuda.is_available():
        if torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY:
            return FLOAT8
    return INT8_WEIGHT_ONLY


def plan_memory(profile: str, device: torch.device | str, compiled: bool = True) -> MemoryPlan:
    """The plan of ``profile`` on ``device`` (``compiled``: whether the transformer blocks will be)."""
    check_profile(profile)
    if profile == "default":
        return MemoryPlan(profile, None, False, None)
    cuda = torch.device(device).type == "cuda"
    return MemoryPlan(profile, weight_format(device, compiled), cuda, BANDED_DECODE_ABOVE_PIXELS)


def is_block_linear(module: torch.nn.Module, fqn: str) -> bool:
    """The linear layers quantized: inside the transformer blocks, not the adapter slots (lora_A/B)."""
    return isinstance(module, torch.nn.Linear) and "transformer_blocks." in fqn and ".lora_" not in fqn


def quantization_config(fmt: str) -> Any:
    """torchao's config for ``fmt``. ``set_inductor_config=False``: by default torchao switches on
    inductor settings for the whole process (coordinate-descent tuning), and every later compile
    of the worker gets slower."""
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8WeightOnlyConfig,
            PerRow,
        )
    except ImportError as exc:
        raise ModelLoadError(f"{fmt} weights need torchao: pip install urae-serve[gpu] ({exc})") from exc
    if fmt == FLOAT8:
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    if fmt == INT8_WEIGHT_ONLY:
        return Int8WeightOnlyConfig(set_inductor_config=False)
    raise ValueError(f"weight format {fmt!r} is not one of {FLOAT8}, {INT8_WEIGHT_ONLY}")


def quantize_block_linears(transformer: torch.nn.Module, fmt: str, device: torch.device | str | None = None) -> int:
    """Quantize the blocks' linear layers to ``fmt`` in place; returns how many.

    With ``device``, torchao moves each layer there just before quantizing it, so that a transformer
    held in CPU memory reaches the GPU already quantized.
    """
    config = quantization_config(fmt)  # first: without torchao, a ModelLoadError that says so
    from torchao.quantization import quantize_

    count = 0

    def chosen(module: torch.nn.Module, fqn: str) -> bool:
        nonlocal count
        take = is_block_linear(module, fqn)
        count += take
        return take

    quantize_(transformer, config, filter_fn=chosen, device=device)
    return count


def move_transformer(transformer: torch.nn.Module, device: torch.device | str) -> None:
    """``transformer.to(device)``, and the shared 0-dim tensors a compiled graph reads with it.

    The adapter slots' scalings (held by every LoRA layer of a slot and by the adapter manager) and the
    proportional-attention ratio (held by every attention processor) are plain tensors, not parameters
    or buffers: each is moved in place (``torch.utils.swap_tensors``), so every holder keeps the same
    tensor object.
    """
    device = torch.device(device)
    transformer.to(device)
    shared: dict[int, torch.Tensor] = {}
    for module in transformer.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict):
            shared.update({id(v): v for v in scaling.values() if isinstance(v, torch.Tensor)})
        ratio = getattr(getattr(module, "processor", None), "logit_ratio", None)
        if isinstance(ratio, torch.Tensor):
            shared[id(ratio)] = ratio
    for value in shared.values():
        if value.device != device:
            torch.utils.swap_tensors(value, value.to(device))


def quantize_for_plan(transformer: torch.nn.Module, plan: MemoryPlan, device: torch.device | str) -> tuple[str, str]:
    """Quantize ``transformer`` as ``plan`` says, onto ``device``: (format used, note).

    fp8 that fails (a kernel, a driver) falls back to int8 weight-only, and the note says why.
    """
    assert plan.weights is not None
    note = ""
    fmt = plan.weights
    try:
        quantize_block_linears(transformer, fmt, device)
    except ModelLoadError:
        raise
    except Exception as exc:  # fp8 refused here: int8 weight-only still fits the budget
        if fmt != FLOAT8:
            raise
        note = f"fp8 failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); int8 weight-only"
        fmt = INT8_WEIGHT_ONLY
        quantize_block_linears(transformer, fmt, device)
    move_transformer(transformer, device)
    return fmt, note


def offload_text_encoders(pipe: Any, device: torch.device | str) -> list[str]:
    """CLIP-L and T5-XXL in CPU memory, streamed onto ``device`` layer by layer while they encode.

    Idempotent; a no-op off CUDA (the text encoders already are in CPU memory there). An encoder whose
    offloading fails stays resident on ``device``; the returned notes say which and why.
    """
    from diffusers.hooks import apply_group_offloading

    from urae.text_encoding import has_group_offload

    device = torch.device(device)
    notes: list[str] = []
    if device.type != "cuda":
        return notes
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is None or has_group_offload(encoder):
            continue
        try:
            apply_group_offloading(encoder, onload_device=device, offload_device=torch.device("cpu"),
                                   offload_type="leaf_level", use_stream=True)
        except Exception as exc:  # pinned memory, streams: the encoder then stays on the GPU
            remove_group_offload(encoder, device)
            notes.append(f"{name} group offload failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); resident")
    return notes


def remove_group_offload(module: torch.nn.Module, device: torch.device | str) -> None:
    """Undo diffusers' group offloading of ``module`` (complete or partial) and keep it on ``device``."""
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(module)
    for hook in ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading"):
        registry.remove_hook(hook, recurse=True)
    module.to(device)


def prepare_pipeline(pipe: Any, plan: MemoryPlan, device: torch.device | str) -> None:
    """Place a pipeline loaded in CPU memory for ``plan``: the VAE on ``device``, the text encoders
    streamed from CPU memory; the transformer stays in CPU memory until it is quantized onto the GPU
    (``quantize_for_plan``), after its adapter slots exist."""
    pipe.vae.to(device)
    if plan.text_encoders_off_gpu:
        offload_text_encoders(pipe, device)  # failures: SpeedSetup notes them when it tries again
    else:
        for encoder in (pipe.text_encoder, pipe.text_encoder_2):
            if encoder is not None:
                encoder.to(device)

