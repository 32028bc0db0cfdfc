"""Loading FLUX.1: a hub id, a local diffusers folder, a single-file checkpoint, or the tiny model."""

from __future__ import annotations

import json
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


# Safetensors dtype names of floating-point weights, narrowest first: a file that mixes them (float32
# norms in a bfloat16 model, say) is loaded in the widest, so that nothing is rounded.
_STORED_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
# FLUX.1 dev and schnell are published in bfloat16; used for a hub id that is not in the local cache.
HUB_WEIGHTS_DTYPE = torch.bfloat16


def stored_dtype(model_id: str) -> torch.dtype:
    """The dtype the transformer's weights are stored in, read from the safetensors headers only.

    ``tiny`` models are float32; a local diffusers folder or single ``.safetensors`` file is read; a hub
    id is read from the local hub cache when it is there, else FLUX.1's published bfloat16 is assumed.
    """
    if model_id in TINY_MODEL_IDS:
        return torch.float32
    path = Path(model_id)
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
    elif model_id in TINY_MODEL_IDS or path.is_file():
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
