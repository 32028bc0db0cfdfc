"""``urae cache``: check a dataset folder and cache its prompt embeddings and VAE latents."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parsers(subparsers: Any) -> None:
    """Register the ``cache`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "cache", help="check a dataset and cache its prompt embeddings and VAE latents (resumable)"
    )
    parser.add_argument("dataset", type=Path, help="folder of images with .json or .txt captions")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: DATASET/.cache/<resolution>")
    parser.add_argument("--resolution", type=int, default=2048, help="target long side, a multiple of 64")
    parser.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens")
    parser.add_argument(
        "--resize",
        choices=("stretch", "crop"),
        default="stretch",
        help="how an image takes its bucket's size: stretch to it (the reference) or cover and crop the center",
    )
    from urae.cli import add_model_arguments

    add_model_arguments(parser)
    parser.set_defaults(func=run_cache)


def default_cache_dir(dataset: Path, resolution: int) -> Path:
    return dataset / ".cache" / str(resolution)


def run_cache(args: argparse.Namespace) -> int:
    """Handler of ``urae cache``: returns the exit code (errors propagate as UraeError)."""
    from urae.cli import resolve_device_dtype
    from urae.data.buckets import bucket_sizes
    from urae.data.cache import cache_dataset
    from urae.data.dataset import scan_dataset
    from urae.models import load_pipeline

    bucket_sizes(args.resolution)  # validates the resolution before any model is loaded
    items = scan_dataset(args.dataset, min_long_side=args.resolution // 2)
    device, dtype = resolve_device_dtype(args)
    pipe = load_pipeline(args.model, device=device, dtype=dtype, offload=args.offload)
    cache_dir = args.cache_dir or default_cache_dir(args.dataset, args.resolution)
    report = cache_dataset(
        pipe,
        items,
        cache_dir,
        model_id=args.model,
        resolution=args.resolution,
        max_sequence_length=args.max_sequence_length,
        resize_mode=args.resize,
    )
    print(f"cached {report.cached}, already cached {report.skipped}, in {report.folder}")
    return 0
