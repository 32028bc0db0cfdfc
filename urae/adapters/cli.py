"""``urae convert`` and ``urae inspect``: adapter files from the command line."""

from __future__ import annotations

import argparse
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from urae.adapters.builtin import BUILTIN_ADAPTERS, resolve_adapter
from urae.adapters.convert import convert_minor_components, default_converted_path
from urae.adapters.formats import AdapterInfo, inspect_adapter
from urae.errors import AdapterNotFoundError, ModelLoadError

DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``convert`` and ``inspect`` subcommands."""
    convert = subparsers.add_parser(
        "convert",
        help="convert a URAE minor-component adapter into a plain LoRA on the original weights",
        description="Exact conversion: delta W = B A - B0 A0 (+ the 2K LoRA fused before the SVD split).",
    )
    convert.add_argument("source", type=Path, help="minor-component .safetensors file (URAE 4K layout)")
    convert.add_argument(
        "--base-lora",
        default=None,
        help=f"the LoRA fused before the split: a .safetensors path or a built-in name ({', '.join(BUILTIN_ADAPTERS)})",
    )
    convert.add_argument(
        "--model", default=os.environ.get("URAE_MODEL", DEFAULT_MODEL), help="base model (tiny works offline)"
    )
    convert.add_argument(
        "--device",
        default=None,
        help="where the float64 SVDs run: cpu, cuda, cuda:1 ... (default: cuda if available)",
    )
    convert.add_argument(
        "-o", "--output", type=Path, default=None, help="output file (default: <source>_lora.safetensors)"
    )
    convert.set_defaults(func=run_convert)

    inspect = subparsers.add_parser(
        "inspect",
        help="describe an adapter file: format, rank, targets, fit",
        description="Exit status 0 when the file is valid (and fits --model), 1 when it does not fit --model, "
        "2 when the file is unusable.",
    )
    inspect.add_argument(
        "file", help=f"adapter .safetensors file, or a built-in name ({', '.join(BUILTIN_ADAPTERS)})"
    )
    inspect.add_argument(
        "--model",
        default=None,
        help="also check that the adapter fits this base model (FLUX.1 dev/schnell ids need no download); "
        "for a built-in name, the model whose adapter it is (default: URAE_MODEL or FLUX.1-dev)",
    )
    inspect.set_defaults(func=run_inspect)

    builtin = subparsers.add_parser(
        "builtin",
        help="write a built-in adapter's file for a model (e.g. a small LoRA to upload for mini or tiny)",
        description="mini's adapters come with the package, the tiny models' are generated (seeded), "
        "FLUX.1's are downloaded from URAE's hub repository.",
    )
    builtin.add_argument("name", choices=BUILTIN_ADAPTERS, help="built-in adapter name")
    builtin.add_argument(
        "--model", default=os.environ.get("URAE_MODEL", DEFAULT_MODEL), help="the model the adapter is for"
    )
    builtin.add_argument("-o", "--output", type=Path, required=True, help="where to write the .safetensors file")
    builtin.set_defaults(func=run_builtin)


# FLUX.1's transformer architecture, to check an adapter's shapes without downloading 24 GB.
FLUX_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    axes_dims_rope=(16, 56, 56),
)
KNOWN_FLUX_MODELS = {"black-forest-labs/FLUX.1-dev": True, "black-forest-labs/FLUX.1-schnell": False}


def shape_transformer(model_id: str) -> nn.Module:
    """A transformer good for shape checks: FLUX.1 dev/schnell on the meta device (no weights), else loaded."""
    if model_id in KNOWN_FLUX_MODELS:
        from diffusers import FluxTransformer2DModel

        with torch.device("meta"):
            return FluxTransformer2DModel(
                **FLUX_TRANSFORMER_CONFIG, guidance_embeds=KNOWN_FLUX_MODELS[model_id]
            )
    return load_transformer(model_id)


def load_transformer(model_id: str) -> nn.Module:
    """The base transformer with its weights, on the CPU, in the dtype they are stored in.

    The conversion computes in float64 from these weights: rounding a float32 base (a user's own
    fine-tuned model, say) to bfloat16 first would move its minor components by ~1%. FLUX.1 as
    published is bfloat16, and loads as such.
    """
    from urae.tiny import TINY_MODEL_IDS

    try:
        from urae.models import load_pipeline, stored_dtype
    except ModuleNotFoundError as exc:
        if exc.name != "urae.models":
            raise
        from urae.tiny import build_tiny_pipeline

        if model_id not in TINY_MODEL_IDS:
            raise ModelLoadError(
                f"cannot load model {model_id!r}: only the tiny models are available"
            ) from None
        pipe: Any = build_tiny_pipeline(model_id)
    else:
        pipe = load_pipeline(model_id, device="cpu", dtype=stored_dtype(model_id))
    transformer: nn.Module = pipe.transformer
    return transformer


def run_convert(args: argparse.Namespace) -> int:
    if not args.source.is_file():
        raise AdapterNotFoundError(f"{args.source}: no such file")
    base_lora = resolve_adapter(args.base_lora, args.model) if args.base_lora else None
    transformer = load_transformer(args.model)
    output = args.output or default_converted_path(args.source)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = convert_minor_components(
        args.source, transformer, base_lora=base_lora, out_path=output, device=device
    )
    info = inspect_adapter(path, transformer)
    print(
        f"wrote {path}: plain LoRA, rank {_rank_text(info)}, {len(info.targets)} modules, "
        f"{info.num_parameters:,} parameters"
    )
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if args.file in BUILTIN_ADAPTERS:  # the same names ``convert --base-lora`` and ``generate --adapter`` take
        path = resolve_adapter(args.file, args.model or os.environ.get("URAE_MODEL", DEFAULT_MODEL))
    elif not path.is_file():
        raise AdapterNotFoundError(
            f"{path}: no such file (built-in adapters are named {', '.join(BUILTIN_ADAPTERS)})"
        )
    transformer = shape_transformer(args.model) if args.model else None
    info = inspect_adapter(path, transformer)
    print(format_info(info, args.model))
    return 0 if info.fits_base is not False else 1


def run_builtin(args: argparse.Namespace) -> int:
    source = resolve_adapter(args.name, args.model)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, args.output)
    info = inspect_adapter(args.output)
    print(f"wrote {args.output}: {args.name} for {args.model}, plain LoRA of rank {_rank_text(info)}, "
          f"{args.output.stat().st_size:,} bytes")
    return 0


def summarise_targets(targets: list[str]) -> str:
    """``38 x single_transformer_blocks.*.attn.to_q, ...``: module names counted over block indices."""
    counts = Counter(_wildcard_block(t) for t in targets)
    return ", ".join(f"{n} x {pattern}" for pattern, n in sorted(counts.items()))


def _wildcard_block(module: str) -> str:
    parts = module.split(".")
    return ".".join("*" if p.isdigit() and i == 1 else p for i, p in enumerate(parts))


def _rank_text(info: AdapterInfo) -> str:
    """The trained rank, and the served (plain LoRA) rank when the export made it larger."""
    if info.trained_rank == info.rank:
        return str(info.rank)
    return f"{info.trained_rank} (exported as a plain LoRA of rank {info.rank})"


def format_info(info: AdapterInfo, model_id: str | None) -> str:
    lines = [
        f"file:       {info.path}",
        f"format:     {info.format.value}",
        f"rank:       {_rank_text(info)}",
        f"targets:    {len(info.targets)} modules: {summarise_targets(info.targets)}",
        f"parameters: {info.num_parameters:,}",
        f"sha256:     {info.sha256}",
    ]
    if info.fits_base is None:
        lines.append("base model: not checked (give --model)")
    elif info.fits_base:
        lines.append(f"base model: fits {model_id}")
    else:
        lines.append(f"base model: does NOT fit {model_id}")
        lines += [f"  - {p}" for p in info.problems[:10]]
        if len(info.problems) > 10:
            lines.append(f"  ... {len(info.problems) - 10} more")
    for key, value in sorted(info.metadata.items()):
        if key != "format":
            lines.append(f"meta {key}: {value if len(value) <= 80 else value[:77] + '...'}")
    return "\n".join(lines)
