"""``urae synth``: generate a training dataset from a prompt list with a teacher model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from urae.errors import InvalidSpecError


def add_parsers(subparsers: Any) -> None:
    """Register the ``synth`` subcommand."""
    from urae.cli import add_model_arguments

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "synth",
        help="generate training images for a prompt list with a teacher (BFL API or a local model); resumable",
    )
    parser.add_argument("prompts", type=Path, help="text file, one prompt per line (or a JSON list)")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to write (or to resume)")
    parser.add_argument("--teacher", choices=["bfl", "local"], default="bfl")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompt i is seed + i")
    parser.add_argument("--concurrency", type=int, default=4, help="prompts in flight at once (bfl)")
    parser.add_argument("--aspect-ratio", default="1:1")
    bfl = parser.add_argument_group("bfl teacher (key from the BFL_API_KEY environment variable)")
    bfl.add_argument("--bfl-url", default=None, help="API base URL (default https://api.bfl.ai)")
    bfl.add_argument("--bfl-model", default="flux-pro-1.1-ultra")
    bfl.add_argument("--output-format", choices=["png", "jpeg"], default="png")
    bfl.add_argument("--raw", action="store_true", help="ultra's raw mode (less processed look)")
    bfl.add_argument("--max-retries", type=int, default=6, help="retries on 429/5xx per request")
    local = parser.add_argument_group("local teacher")
    add_model_arguments(local)  # type: ignore[arg-type]
    local.add_argument("--preset", default="2k", help="1k, 2k or 4k")
    local.add_argument("--adapter", action="append", default=[], help="name[:weight]; repeatable")
    local.add_argument("--steps", type=int, default=None)
    parser.set_defaults(func=run_synth)


def make_teacher(args: argparse.Namespace) -> Any:
    """The teacher the arguments describe."""
    if args.teacher == "bfl":
        from urae.synth.teachers import BFL_BASE_URL, BflTeacher, RetryPolicy

        if args.max_retries < 0:
            raise InvalidSpecError("max_retries", "must be at least 0")
        return BflTeacher(
            base_url=args.bfl_url or BFL_BASE_URL,
            model=args.bfl_model,
            aspect_ratio=args.aspect_ratio,
            output_format=args.output_format,
            raw=args.raw,
            retry=RetryPolicy(max_retries=args.max_retries),
        )
    from urae.cli import resolve_device_dtype
    from urae.synth.teachers import LocalTeacher

    device, dtype = resolve_device_dtype(args)
    overrides = {"steps": args.steps} if args.steps is not None else {}
    return LocalTeacher(
        args.model,
        preset=args.preset,
        aspect_ratio=args.aspect_ratio,
        adapters=tuple(args.adapter),
        device=device,
        dtype=dtype,
        offload=args.offload,
        overrides=overrides,
    )


def run_synth(args: argparse.Namespace) -> int:
    """Handler of ``urae synth``: 0 when every prompt is done or moderated, 1 when some failed."""
    from urae.synth.synthesize import read_prompts, synthesize

    prompts = read_prompts(args.prompts)
    teacher = make_teacher(args)
    # A local model runs one image at a time; concurrency only helps a remote teacher.
    concurrency = args.concurrency if args.teacher == "bfl" else 1
    report = synthesize(prompts, args.out, teacher, seed=args.seed, concurrency=concurrency)
    print(
        f"{len(report.done)} generated, {len(report.skipped)} already done, "
        f"{len(report.moderated)} moderated, {len(report.failed)} failed; manifest: {report.manifest}"
    )
    for index, reason in sorted(report.failed.items()):
        print(f"urae synth: prompt {index} failed: {reason}", file=sys.stderr)
    if report.failed:
        print("urae synth: run the same command again to retry the failed prompts", file=sys.stderr)
        return 1
    return 0
