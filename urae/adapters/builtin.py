"""Built-in adapters by name: URAE's published files for real models, seeded stand-ins for the tiny ones.

For the tiny models every file is generated on first use and cached, so each code path that uses a
built-in adapter (2K LoRA, converted 4K minor-component adapter) runs offline with the same bytes in
every process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from urae.adapters.convert import convert_minor_components
from urae.adapters.formats import save_lora, save_minor_components
from urae.adapters.minor_components import linear_weight, minor_component_targets, svd_split
from urae.errors import AdapterDownloadError, AdapterNotFoundError, NotSafetensorsError

BUILTIN_ADAPTERS = ("urae-2k", "urae-4k", "urae-4k-schnell")
URAE_HUB_REPO = "Huage001/URAE"
HUB_FILENAMES = {
    "urae-2k": "urae_2k_adapter.safetensors",
    # The 4K minor-component adapter, already converted to a rank-48 LoRA on the original weights.
    "urae-4k": "urae_4k_adapter_lora_conversion_dev.safetensors",
    "urae-4k-schnell": "urae_4k_adapter_lora_conversion_schnell.safetensors",
}
TINY_MODEL_IDS = ("tiny", "tiny-schnell")
DEFAULT_TINY_CACHE = Path("~/.cache/urae/tiny-adapters")
# Bump when the generated tiny files change, so that stale caches are not reused.
TINY_ADAPTER_VERSION = "v2"
TINY_RANK = 16  # URAE's rank for both the 2K LoRA and the 4K minor components
# ||B A|| relative to ||W||: a trained LoRA moves a weight by a few percent.
TINY_LORA_RELATIVE_NORM = 0.05
# How far the tiny "trained" minor components are from their SVD initialisation.
TINY_MINOR_RELATIVE_CHANGE = 0.3
_SEEDS = {"urae-2k": 2_000, "urae-4k": 4_000, "urae-4k-schnell": 4_001}


def resolve_adapter(name_or_path: str, model_id: str, cache_dir: Path | None = None) -> Path:
    """The local safetensors file for a path or a built-in adapter name.

    Real model ids download URAE's published file; ``mini`` has its own trained adapters in the
    package; ``tiny``/``tiny-schnell`` get seeded files generated into ``cache_dir`` (default ``~/.cache/urae/tiny-adapters``) on first use.
    """
    if name_or_path in BUILTIN_ADAPTERS:
        if model_id == "mini":
            from urae.mini.model import builtin_adapter_path

            return builtin_adapter_path(name_or_path)
        if model_id in TINY_MODEL_IDS:
            return tiny_adapter_path(name_or_path, model_id, cache_dir)
        return _download(name_or_path, cache_dir)
    looks_like_path = (
        name_or_path.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")) or os.sep in name_or_path
    )
    if not looks_like_path:
        raise AdapterNotFoundError(
            f"{name_or_path}: unknown adapter; built-in adapters are {', '.join(BUILTIN_ADAPTERS)}, "
            "or give the path of a .safetensors file"
        )
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise AdapterNotFoundError(f"{path}: no such adapter file")
    if path.suffix != ".safetensors":
        raise NotSafetensorsError(
            f"{path}: only .safetensors adapters are accepted (pickles are never loaded)"
        )
    return path


def local_builtin_adapter(name: str, model_id: str, cache_dir: Path | None = None) -> Path | None:
    """The built-in adapter's file when it needs no download: mini's, the tiny models' (generated on
    first use), or URAE's file already in the Hugging Face cache. None otherwise."""
    if model_id == "mini" or model_id in TINY_MODEL_IDS:
        try:
            return resolve_adapter(name, model_id, cache_dir)
        except AdapterNotFoundError:
            return None  # mini has no urae-4k-schnell
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(URAE_HUB_REPO, HUB_FILENAMES[name], cache_dir=cache_dir)
    return Path(cached) if isinstance(cached, str) else None


def _download(name: str, cache_dir: Path | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(URAE_HUB_REPO, HUB_FILENAMES[name], cache_dir=cache_dir))
    except Exception as exc:  # network, authentication, missing file: all mean "not available here"
        raise AdapterDownloadError(
            f"{URAE_HUB_REPO}/{HUB_FILENAMES[name]}: download failed ({type(exc).__name__}: {exc})"
        ) from None


def tiny_adapter_path(name: str, model_id: str, cache_dir: Path | None = None) -> Path:
    """The cached tiny stand-in for a built-in adapter, generated on first use."""
    if name not in BUILTIN_ADAPTERS:
        raise AdapterNotFoundError(
            f"{name}: unknown adapter; built-in adapters are {', '.join(BUILTIN_ADAPTERS)}"
        )
    folder = (cache_dir or DEFAULT_TINY_CACHE).expanduser() / model_id
    path = folder / f"{name}-{TINY_ADAPTER_VERSION}.safetensors"
    if path.is_file():
        return path
    from urae.tiny import build_tiny_pipeline

    pipe: Any = build_tiny_pipeline(model_id)
    transformer: nn.Module = pipe.transformer
    if name == "urae-2k":
        return save_lora(path, tiny_lora_layers(transformer, _SEEDS[name]), metadata={"urae_builtin": name})
    base_lora = tiny_adapter_path("urae-2k", model_id, cache_dir)
    source = folder / f"{name}-minor-components-{TINY_ADAPTER_VERSION}.safetensors"
    if not source.is_file():
        fused = tiny_lora_layers(transformer, _SEEDS["urae-2k"])
        save_minor_components(source, tiny_minor_component_layers(transformer, _SEEDS[name], fused))
    return convert_minor_components(source, transformer, base_lora=base_lora, out_path=path)


def tiny_lora_layers(
    transformer: nn.Module, seed: int, rank: int = TINY_RANK
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A seeded random LoRA in URAE's 2K layout, each delta ~5% of its weight's norm."""
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in minor_component_targets(transformer):
        weight = linear_weight(transformer, module).detach().to(torch.float32)
        out_features, in_features = weight.shape
        down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        up = torch.randn(out_features, rank, generator=generator)
        up *= TINY_LORA_RELATIVE_NORM * weight.norm() / (up @ down).norm()
        layers[module] = (up, down)
    return layers


def tiny_minor_component_layers(
    transformer: nn.Module,
    seed: int,
    base_lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    rank: int = TINY_RANK,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Seeded "trained" minor components: the SVD initialisation of the fused weight, perturbed."""
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in minor_component_targets(transformer):
        w64 = linear_weight(transformer, module).detach().to(torch.float64)
        if base_lora and module in base_lora:
            up, down = base_lora[module]
            w64 = w64 + up.to(torch.float64) @ down.to(torch.float64)
        _, b0, a0 = svd_split(w64, rank)
        b = b0 + TINY_MINOR_RELATIVE_CHANGE * b0.std() * torch.randn(
            b0.shape, generator=generator, dtype=torch.float64
        )
        a = a0 + TINY_MINOR_RELATIVE_CHANGE * a0.std() * torch.randn(
            a0.shape, generator=generator, dtype=torch.float64
        )
        layers[module] = (b.to(torch.float32), a.to(torch.float32))
    return layers
