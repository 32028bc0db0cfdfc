"""Exact conversion of URAE minor-component adapters into plain LoRAs on the ORIGINAL base weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from urae.adapters.formats import (
    AdapterFormat,
    AdapterInfo,
    file_sha256,
    inspect_adapter,
    load_adapter_layers,
    load_lora_state_dict,
    save_lora,
    write_atomically,
    write_safetensors,
)
from urae.adapters.minor_components import difference_lora, linear_weight, svd_split
from urae.errors import AdapterFormatError


def default_converted_path(path_4k: Path) -> Path:
    """Where a converted file goes when no output path is given: ``<stem>_lora.safetensors`` alongside."""
    return path_4k.with_name(f"{path_4k.stem}_lora.safetensors")


@torch.no_grad()
def convert_minor_components(
    path_4k: str | os.PathLike[str],
    transformer: nn.Module,
    base_lora: str | os.PathLike[str] | None = None,
    out_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> Path:
    """Convert a URAE minor-component file into a plain LoRA for the ORIGINAL ``transformer`` weights.

    ``base_lora`` is the LoRA that was fused before the SVD split (URAE's 2K adapter for the official
    4K file; None for a minor-component fine-tune of the plain base). Per target, with W the fused
    weight and B0 A0 its r smallest components: delta = B A - B0 A0 + B2k A2k, stored as the rank
    2r + r2k stack [B | -B0 | B2k] [A; A0; A2k]. Modules only the base LoRA touches keep its pair.
    The transformer is not modified. ``dtype`` is the output's; ``device`` is where the float64 SVDs
    run (default: where the weights are). A 3072 x 3072 split takes ~100 s on two CPU cores, so the
    real model's 190 matrices want a GPU. Returns the written path.
    """
    path_4k = Path(path_4k)
    adapter_format, minor = load_adapter_layers(path_4k, transformer)
    if adapter_format is not AdapterFormat.MINOR_COMPONENTS:
        raise AdapterFormatError(f"{path_4k}: is already a plain LoRA, not a URAE minor-component file")
    fused: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if base_lora is not None:
        state = load_lora_state_dict(base_lora, transformer)
        for key, down in state.items():
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                fused[module] = (state[key.replace(".lora_A.", ".lora_B.")], down)
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in sorted(set(minor) | set(fused)):
        extra = None
        if module in fused:
            up2k, down2k = fused[module]
            extra = (up2k.to(torch.float64), down2k.to(torch.float64))
        if module not in minor:
            assert extra is not None
            layers[module] = (extra[0].to(dtype), extra[1].to(dtype))
            continue
        # Work on a float64 copy of the original weight: the transformer stays untouched.
        weight = linear_weight(transformer, module).detach()
        svd_device = torch.device(device) if device is not None else weight.device
        w64 = weight.to(svd_device, torch.float64)
        if extra is not None:
            w64 = w64 + extra[0].to(svd_device) @ extra[1].to(svd_device)
        b, a = minor[module]
        # Only the product B0 A0 (the r smallest components) enters the delta, so the signs the SVD
        # picks for singular vectors, which may differ from the trainer's, do not matter.
        _, b0, a0 = svd_split(w64, a.shape[0])
        up, down = difference_lora(b.to(torch.float64), a.to(torch.float64), b0.cpu(), a0.cpu(), extra)
        layers[module] = (up.to(dtype), down.to(dtype))
    metadata = {
        "urae_source_format": AdapterFormat.MINOR_COMPONENTS.value,
        "urae_source_sha256": file_sha256(path_4k),
        # The minor-component rank r: what the adapter was trained at (the file's rank is 2r + r2k).
        "rank": str(max(a.shape[0] for _, a in minor.values())),
    }
    if base_lora is not None:
        metadata["urae_base_lora_sha256"] = file_sha256(base_lora)
    out = Path(out_path) if out_path is not None else default_converted_path(path_4k)
    return save_lora(out, layers, metadata=metadata)


def prepare_for_serving(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    transformer: nn.Module,
    base_lora: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
) -> AdapterInfo:
    """Validate an uploaded adapter and write the servable plain LoRA to ``dest`` (atomically).

    A plain LoRA is rewritten with normalised diffusers keys (alpha folded, metadata kept); a
    minor-component file is converted (see :func:`convert_minor_components`). Bad input raises a
    specific AdapterError and nothing is written. ``device``: see :func:`convert_minor_components`.
    """
    src, dest = Path(src), Path(dest)
    info = inspect_adapter(src)
    if info.format is AdapterFormat.MINOR_COMPONENTS:
        convert_minor_components(src, transformer, base_lora=base_lora, out_path=dest, device=device)
    else:
        state = load_lora_state_dict(src, transformer)
        tensors = {k: v.contiguous().clone() for k, v in state.items()}
        metadata = {"format": "pt", **info.metadata, "urae_format": AdapterFormat.LORA.value}
        # Alpha is folded into B now; a recorded peft config would scale it a second time.
        metadata.pop("lora_adapter_metadata", None)
        write_atomically(dest, lambda tmp: write_safetensors(tmp, tensors, metadata, shown_as=dest))
    return inspect_adapter(dest, transformer)
