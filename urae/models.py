"""Loading FLUX.1: a hub id, a local diffusers folder, a single-file checkpoint, or the tiny model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from urae.errors import ModelLoadError
from urae.mini.model import MINI_MODEL_ID
from urae.mini.model import WEIGHTS_PATH as MINI_WEIGHTS_PATH
from urae.tiny import TINY_MODEL_IDS, build_tiny_pipeline

DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"
SCHNELL_MODEL = "black-forest-labs/FLUX.1-schnell"
OFFLOAD_MODES = (None, "model", "sequential")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}") from None


# Safetensors dtype names of floating-point weights, narrowest first: a file that mixes them (float32
# norms in a bfloat16 model, say) is loaded in the widest, so that nothing is rounded.
_STORED_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
# FLUX.1 dev and schnell are published in bfloat16; used for a hub id that is not in the local cache.
HUB_WEIGHTS_DTYPE = torch.bfloat16


def stored_dtype(model_id: str) -> torch.dtype:
    """The dtype the transformer's weights are stored in, read from the safetensors headers only.

    ``tiny`` models are float32; ``mini`` is read from its weights file; a local diffusers folder or single ``.safetensors`` file is read; a hub
    id is read from the local hub cache when it is there, else FLUX.1's published bfloat16 is assumed.
    """
    if model_id in TINY_MODEL_IDS:
        return torch.float32
    path = MINI_WEIGHTS_PATH if model_id == MINI_MODEL_ID else Path(model_id)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted((path / "transformer").glob("*.safetensors")) or sorted(path.glob("*.safetensors"))
    else:
        files = _cached_hub_weights(model_id)
        if not files:
            return HUB_WEIGHTS_DTYPE
    found = {name for file in files for name in _header_dtypes(file)} & set(_STORED_FLOAT_DTYPES)
    if not found:
        raise ModelLoadError(f"cannot load model {model_id!r}: no floating-point safetensors weights found")
    return max((_STORED_FLOAT_DTYPES[name] for name in found), key=lambda d: torch.finfo(d).bits)


def _header_dtypes(file: Path) -> set[str]:
    try:
        with file.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the weights header of {file}: {exc}") from None
    return {entry["dtype"] for key, entry in header.items() if key != "__metadata__" and isinstance(entry, dict)}


def _cached_hub_weights(model_id: str) -> list[Path]:
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model_id, local_files_only=True, allow_patterns=["transformer/*"]))
    except (OSError, ValueError):  # not cached, or not a repo id: the caller assumes the published dtype
        return []
    return sorted((folder / "transformer").glob("*.safetensors"))


def stored_transformer_tensors(model_id: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The named transformer tensors as stored (dtype unchanged), on the CPU.

    From a local diffusers folder or the local hub cache, whose keys are the module paths; empty when
    the weights are elsewhere (a single-file checkpoint names its tensors differently, the tiny models
    have no files). Lets a computation start from a float32 base that the pipeline loaded in bf16.
    """
    path = Path(model_id)
    if path.is_dir():
        files = sorted((path / "transformer").glob("*.safetensors"))
    elif model_id in TINY_MODEL_IDS or model_id == MINI_MODEL_ID or path.is_file():
        return {}
    else:
        files = _cached_hub_weights(model_id)
    from safetensors import safe_open

    wanted = set(names)
    found: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in wanted.intersection(f.keys()):
                found[key] = f.get_tensor(key)
    return found


def is_schnell(pipe: FluxPipeline) -> bool:
    """schnell has no guidance embedding (it is timestep-distilled, run with guidance 0)."""
    return not pipe.transformer.config.guidance_embeds


def load_pipeline(
    model_id: str = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: str | torch.dtype = torch.bfloat16,
    offload: str | None = None,
    base_model: str = DEFAULT_MODEL,
) -> FluxPipeline:
    """Load a FLUX.1 pipeline; the caller chooses device, dtype and offload mode.

    ``model_id`` is ``tiny``/``tiny-schnell``, ``mini`` (trained, shipped in the package), a hub id, a local diffusers folder, or a single
    ``.safetensors`` transformer checkpoint (its VAE and text encoders then come from ``base_model``).
    ``offload``: None (everything on ``device``), ``model`` (model CPU offload) or ``sequential``.
    """
    torch_dtype = parse_dtype(dtype)
    if offload not in OFFLOAD_MODES:
        raise ModelLoadError(f"offload {offload!r} is not one of none, model, sequential")
    try:
        if model_id in TINY_MODEL_IDS:
            pipe = build_tiny_pipeline(model_id, dtype=torch_dtype)
        elif model_id == MINI_MODEL_ID:
            from urae.mini.model import build_mini_pipeline

            pipe = build_mini_pipeline(dtype=torch_dtype)
        elif model_id.endswith(".safetensors") and Path(model_id).is_file():
            transformer = FluxTransformer2DModel.from_single_file(model_id, dtype=torch_dtype)
            pipe = FluxPipeline.from_pretrained(base_model, transformer=transformer, dtype=torch_dtype)
        else:
            local = Path(model_id).is_dir()
            pipe = FluxPipeline.from_pretrained(model_id, dtype=torch_dtype, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {model_id!r}: {str(exc).splitlines()[0]}") from exc
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval()
        module.requires_grad_(False)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


# Best first. FA3 (Hopper) through diffusers' attention backends when its kernels are installed
# (flash_attn_interface, or the hub build in the image), then cuDNN attention, FA2, then PyTorch's SDPA.
CUDA_ATTENTION_BACKENDS = ("_flash_3", "_flash_3_hub", "_native_cudnn", "flash", "native")


def attention_backend_works(
    backend: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int] | None = None
) -> bool:
    """Whether ``backend`` runs here: its requirements import and an attention call succeeds.

    On CUDA the call has FLUX's real shape at 2K (1 x 16,896 tokens x 24 heads x 128): a kernel can
    accept a small probe and refuse the real sequence length or head count. Elsewhere a small one.
    """
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
        dispatch_attention_fn,
    )

    from urae.attention import FLUX_2K_ATTENTION_SHAPE

    if shape is None:
        shape = FLUX_2K_ATTENTION_SHAPE if torch.device(device).type == "cuda" else (1, 128, 2, 128)
    try:
        name = AttentionBackendName(backend)
        _check_attention_backend_requirements(name)
        q = torch.randn(shape, device=device, dtype=dtype)
        out = dispatch_attention_fn(q, q, q, scale=None, backend=name)
        return bool(torch.isfinite(out).all())
    except Exception:  # any failure (missing package, kernel, GPU arch, dtype) means: not this one
        return False


def choose_attention_backend(
    transformer: FluxTransformer2DModel, device: torch.device | None = None, preference: str = "auto"
) -> str:
    """Set and return the attention backend of every attention module of ``transformer``.

    ``auto``: on CUDA the first of :data:`CUDA_ATTENTION_BACKENDS` that works (FA3, cuDNN, FA2,
    SDPA); elsewhere ``native`` (PyTorch SDPA). A named backend that does not work raises
    :class:`ModelLoadError`.
    """
    param = next(transformer.parameters())
    device, dtype = device or param.device, param.dtype
    if preference != "auto":
        if not attention_backend_works(preference, device, dtype):
            raise ModelLoadError(f"attention backend {preference!r} does not run on {device} with {dtype}")
        chosen = preference
    elif device.type != "cuda":
        chosen = "native"
    else:
        half = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        chosen = next(b for b in CUDA_ATTENTION_BACKENDS if b == "native" or attention_backend_works(b, device, half))
    # diffusers logs a warning on every call that attention backends are experimental.
    diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
    level = diffusers_log.level
    diffusers_log.setLevel(logging.ERROR)
    try:
        transformer.set_attention_backend(chosen)
    finally:
        diffusers_log.setLevel(level)
    return chosen


def compile_blocks(transformer: FluxTransformer2DModel, backend: str = "inductor") -> int:
    """Regional compilation: each repeated block (diffusers' ``_repeated_blocks``) compiled, fullgraph.

    The same blocks as ``transformer.compile_repeated_blocks(fullgraph=True)``, but the block's
    ``forward`` is compiled rather than the module call: diffusers' step-cache hooks (turbo) then wrap
    the compiled code from outside instead of being traced into it (First Block Cache's skip decision
    is a graph break, which fullgraph refuses). Sequence lengths are dynamic: one graph serves every
    size. ``backend``: torch.compile's (tests use "eager" to check guards without code generation).
    Returns the number of compiled blocks.
    """
    names = set(getattr(transformer, "_repeated_blocks", ()))
    count = 0
    for module in transformer.modules():
        if type(module).__name__ in names:
            module.forward = torch.compile(module.forward, fullgraph=True, dynamic=True, backend=backend)
            count += 1
    if not count:
        raise ModelLoadError(f"{type(transformer).__name__} has no repeated blocks to compile")
    return count
