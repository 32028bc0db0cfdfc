"""GPU memory of FLUX.1-dev under each memory profile, counted on the meta device with the real
architecture's shapes: no GPU, no weights, seconds on a CPU.

- resident: what a worker keeps on the GPU between requests: the transformer's weights as the
  profile stores them (the 8-bit ones through torchao's own quantization, run on meta tensors), the
  adapter slots, the VAE, and the text encoders unless the profile streams them from CPU memory;
- step: one denoising step's own tensors at 2K and 4K (the transformer forward with URAE's settings,
  eager, so every temporary PyTorch allocates; attention as a fused GPU kernel allocates it: output
  and log-sum-exp, never the N x N matrix);
- decode: the VAE decode the profile chooses at that size (full, or exact in bands);
- text: T5-XXL encoding 512 tokens, streamed layer by layer when the profile offloads it (the two
  largest layers on the GPU at once) or resident.

A size's peak is the resident set plus the largest of step, decode and text. Not counted: the CUDA
context (~0.5 GiB, outside PyTorch's allocator) and the allocator's rounding and fragmentation; the
device check measures the real thing under a 24 GB cap. Steps are counted eager: what uncompiled
blocks hold, and an upper bound on compiled ones (inductor fuses the float32 upcasts of RMSNorm, RoPE
and fp8's activation scaling into single passes). That is why the 24gb profile stores fp8 only where
the blocks are compiled, int8 weight-only otherwise (urae.memory_profile).

    python bench/memory_accounting.py                  # both profiles, 2K and 4K
    python bench/memory_accounting.py --sizes 2048     # one size
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_arch import CLIP_L_TEXT, FLUX_DEV_TRANSFORMER, FLUX_VAE, T5_XXL_ENCODER  # noqa: E402

GIB = 2**30
BUDGET_BYTES = 24 * 10**9
TEXT_TOKENS = 512
SLOT_RANK = 64  # URAE_HOTSWAP_RANK's default
SLOTS = 2


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors created inside it, counted per storage (a view adds
    nothing) and released when the last tensor of a storage is freed.

    (torch.distributed._tools.mem_tracker does this for training: it hooks parameters' gradients
    and refuses frozen models.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= self.sizes.pop(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key not in self.refs:
                self.refs[key] = 0
                self.sizes[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            self.refs[key] += 1
            weakref.finalize(tensor, self._release, key)
        return out


class FusedAttention(TorchFunctionMode):
    """``scaled_dot_product_attention`` as a GPU's fused kernel allocates it (output and log-sum-exp;
    flash attention's meta kernel), not as the math fallback that meta tensors would take otherwise
    (the N x N scores: 418 GB at 4K)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
            given = {**dict(zip(names, args, strict=False)), **kwargs}
            if given.get("attn_mask") is None and not given.get("dropout_p") and not given.get("is_causal"):
                q, k, v = given["query"], given["key"], given["value"]
                fused = (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu if q.device.type == "cpu"
                         else torch.ops.aten._scaled_dot_product_flash_attention)
                return fused(q, k, v, scale=given.get("scale"))[0]
        return func(*args, **kwargs)


def peak_bytes(fn: Callable[[], Any]) -> int:
    """The peak of what ``fn`` allocates (beyond what existed before), attention counted as fused."""
    counter = LiveBytes()
    with torch.no_grad(), FusedAttention(), counter:
        result = fn()
        del result
    return counter.peak


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage once (a quantized weight is its
    8-bit data and its scales)."""
    seen: set[int] = set()
    total = 0

    def add(tensor: torch.Tensor) -> None:
        nonlocal total
        if is_traceable_wrapper_subclass(tensor):
            names, _ = tensor.__tensor_flatten__()
            for name in names:
                add(getattr(tensor, name))
            return
        storage = tensor.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            total += storage.nbytes()

    for tensor in [*module.parameters(), *module.buffers()]:
        add(tensor)
    # The adapter slots' shared scalings are plain tensors held in dicts, not parameters.
    for sub in module.modules():
        for value in getattr(sub, "scaling", {}).values() if isinstance(getattr(sub, "scaling", None), dict) else ():
            if isinstance(value, torch.Tensor):
                add(value)
    return total


@contextlib.contextmanager
def float8_without_gpu() -> Iterator[None]:
    """torchao quantizes to fp8 only where the current GPU computes in it; on meta tensors nothing
    computes, so its hardware check is skipped here (accounting only)."""
    from torchao.quantization import quant_api

    check = quant_api._check_hardware_support
    quant_api._check_hardware_support = lambda *args, **kwargs: None
    try:
        yield
    finally:
        quant_api._check_hardware_support = check


def meta_transformer(weights: str | None, slot_rank: int = SLOT_RANK, slots: int = SLOTS) -> Any:
    """FLUX.1-dev's transformer on meta in bf16, with the worker's adapter slots, stored as ``weights``
    (None: bf16; else a urae.memory_profile format) by the same code a worker runs."""
    from diffusers import FluxTransformer2DModel

    from urae.adapters.manager import AdapterManager
    from urae.memory_profile import FLOAT8, quantize_block_linears

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER).to(torch.bfloat16)
    transformer.requires_grad_(False)
    AdapterManager(SimpleNamespace(transformer=transformer), rank=slot_rank, slots=slots)
    if weights is not None:
        with float8_without_gpu() if weights == FLOAT8 else contextlib.nullcontext():
            quantize_block_linears(transformer, weights)
    return transformer


def meta_models() -> dict[str, Any]:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        models = {
            "vae": AutoencoderKL(**FLUX_VAE),
            "clip": CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
            "t5": T5EncoderModel(T5Config(**T5_XXL_ENCODER)),
        }
    for model in models.values():
        model.to(torch.bfloat16).requires_grad_(False).eval()
    return models


def step_bytes(transformer: Any, size: int) -> int:
    """One denoising step at ``size`` x ``size`` with the 2K/4K presets' settings (NTK x10,
    proportional attention in its graph-stable tensor mode)."""
    from urae.attention import apply_high_res_settings

    image_tokens = (size // 16) ** 2
    apply_high_res_settings(transformer, 10.0, True, num_tokens=TEXT_TOKENS + image_tokens)
    cfg = transformer.config

    def run() -> Any:
        side = size // 16
        img_ids = torch.zeros(side, side, 3, device="meta")
        return transformer(
            hidden_states=torch.empty(1, image_tokens, cfg.in_channels, device="meta", dtype=torch.bfloat16),
            encoder_hidden_states=torch.empty(1, TEXT_TOKENS, cfg.joint_attention_dim, device="meta", dtype=torch.bfloat16),
            pooled_projections=torch.empty(1, cfg.pooled_projection_dim, device="meta", dtype=torch.bfloat16),
            timestep=torch.empty(1, device="meta", dtype=torch.bfloat16),
            guidance=torch.empty(1, device="meta", dtype=torch.bfloat16),
            img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(TEXT_TOKENS, 3, device="meta"),
            return_dict=False,
        )[0]

    return peak_bytes(run)


def decode_bytes(vae: Any, size: int, mode: str) -> int:
    from urae.vae_decode import decode_latents_reporting_mode

    latents = torch.empty(1, vae.config.latent_channels, size // 8, size // 8, device="meta", dtype=torch.bfloat16)
    return peak_bytes(lambda: decode_latents_reporting_mode(vae, latents, mode)[0])


def text_bytes(models: dict[str, Any], streamed: bool) -> int:
    """T5 encoding 512 tokens (CLIP's 77 are far smaller): its own tensors, plus, when streamed, the
    two largest layers on the GPU at once (group offloading prefetches the next layer)."""
    t5 = models["t5"]
    ids = torch.zeros(1, TEXT_TOKENS, dtype=torch.long, device="meta")
    activations = peak_bytes(lambda: t5(input_ids=ids).last_hidden_state)
    if not streamed:
        return activations
    layers = sorted((tensor_bytes(m) for m in t5.modules() if not list(m.children())), reverse=True)
    return activations + sum(layers[:2])


@dataclass
class Account:
    profile: str
    weights: str
    resident: int
    transformer: int
    sizes: dict[int, dict[str, int]]  # size -> step, decode, text, peak (bytes)
    seconds: float


def account(profile: str, sizes: list[int], weights: str | None = None) -> Account:
    """Count ``profile`` on a GPU of the kind it targets (fp8 weights for 24gb unless ``weights``)."""
    from urae.memory_profile import BANDED_DECODE_ABOVE_PIXELS, FLOAT8, MemoryPlan
    from urae.vae_decode import choose_mode

    started = time.perf_counter()
    if profile == "24gb":
        plan = MemoryPlan("24gb", weights or FLOAT8, True, BANDED_DECODE_ABOVE_PIXELS)
    else:
        plan = MemoryPlan("default", None, False, None)
    transformer = meta_transformer(plan.weights)
    models = meta_models()
    # default: T5 group-offloaded (URAE_TEXT_ENCODER_OFFLOAD=auto on CUDA), CLIP resident.
    resident = tensor_bytes(transformer) + tensor_bytes(models["vae"])
    if not plan.text_encoders_off_gpu:
        resident += tensor_bytes(models["clip"])
    text = text_bytes(models, streamed=True)
    counted: dict[int, dict[str, int]] = {}
    for size in sizes:
        mode = choose_mode(plan.decode_mode("auto", size, size), size, size)
        step, decode = step_bytes(transformer, size), decode_bytes(models["vae"], size, mode)
        counted[size] = {"step": step, "decode": decode, "text": text, "peak": resident + max(step, decode, text),
                         "decode_mode": mode}  # type: ignore[dict-item]
    return Account(profile, plan.weights or "bfloat16", resident, tensor_bytes(transformer), counted,
                   time.perf_counter() - started)


def table(accounts: list[Account]) -> list[str]:
    sizes = sorted({s for a in accounts for s in a.sizes})
    head = "| profile | weights | transformer GiB | resident GiB | " + " | ".join(
        f"{s} step / decode / text GiB | {s} peak GiB" for s in sizes) + " | fits 24 GB uncompiled |"
    lines = [head, "|---|---|---:|---:|" + "---|---:|" * len(sizes) + "---|"]
    for a in accounts:
        cells = []
        for s in sizes:
            c = a.sizes[s]
            cells.append(f"{c['step'] / GIB:.2f} / {c['decode'] / GIB:.2f} ({c['decode_mode']}) / {c['text'] / GIB:.2f} | "
                         f"{c['peak'] / GIB:.2f}")
        fits = all(c["peak"] <= BUDGET_BYTES for c in a.sizes.values())
        lines.append(f"| {a.profile} | {a.weights} | {a.transformer / GIB:.2f} | {a.resident / GIB:.2f} | "
                     + " | ".join(cells) + f" | {'yes' if fits else 'no'} ({BUDGET_BYTES / GIB:.2f} GiB) |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    args = parser.parse_args(argv)
    from urae.memory_profile import INT8_WEIGHT_ONLY

    accounts = [account("default", args.sizes), account("24gb", args.sizes),
                account("24gb", args.sizes, weights=INT8_WEIGHT_ONLY)]
    print("default: bf16 weights, CLIP resident, T5 streamed (URAE_TEXT_ENCODER_OFFLOAD=auto); 24gb float8: GPUs of "
          "compute capability >= 8.9 with compiled blocks (eager counts shown); 24gb int8_weight_only: Ampere, or uncompiled")
    print("\n".join(table(accounts)))
    print(f"counted in {sum(a.seconds for a in accounts):.1f} s on the meta device; real FLUX.1-dev shapes, "
          f"{SLOTS} adapter slots of rank {SLOT_RANK}; CUDA context and allocator rounding not included")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
