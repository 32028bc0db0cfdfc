"""Loading FLUX.1: a hub id, a local diffusers folder, a single-file checkpoint, or the tiny model."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from urae.errors import ModelLoadError
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

    ``model_id`` is ``tiny``/``tiny-schnell``, a hub id, a local diffusers folder, or a single
    ``.safetensors`` transformer checkpoint (its VAE and text encoders then come from ``base_model``).
    ``offload``: None (everything on ``device``), ``model`` (model CPU offload) or ``sequential``.
    """
    torch_dtype = parse_dtype(dtype)
    if offload not in OFFLOAD_MODES:
        raise ModelLoadError(f"offload {offload!r} is not one of none, model, sequential")
    try:
        if model_id in TINY_MODEL_IDS:
            pipe = build_tiny_pipeline(model_id, dtype=torch_dtype)
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
