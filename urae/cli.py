"""The ``urae`` command line: generate, and the subcommands of the adapter and training modules."""

from __future__ import annotations

import argparse
import importlib
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from PIL import Image

from urae.errors import GenerationCanceled, InvalidSpecError, UraeError
from urae.spec import MAX_INPUT_PIXELS

# Modules that contribute subcommands through ``add_parsers(subparsers)``.
SUBCOMMAND_MODULES = ("urae.adapters.cli", "urae.train.cli", "urae.synth.cli", "urae.data.cli")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model/--device/--dtype/--offload, shared by every subcommand that loads FLUX."""
    parser.add_argument(
        "--model",
        default=_default_model(),
        help="hub id, local diffusers folder, single-file .safetensors, or tiny / tiny-schnell (offline)",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--offload", default=None, choices=["model", "sequential"], help="CPU offload mode")


def resolve_device_dtype(args: argparse.Namespace) -> tuple[str, str]:
    device = args.device or default_device()
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    return device, dtype


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate images at 1K/2K/4K with URAE's settings")
    p.add_argument("prompt")
    p.add_argument(
        "--preset", default="1k", help="1k, 2k or 4k (the schnell row is chosen for schnell models)"
    )
    p.add_argument("--aspect-ratio", default="1:1", help="W:H at the preset's pixel budget, e.g. 16:9")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int, help="default: a random seed, printed with each image (like the API)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--max-sequence-length", type=int)
    p.add_argument("--ntk-factor", type=float)
    p.add_argument("--shift", type=float, help="static timestep shift")
    p.add_argument("--vae-decode", choices=["auto", "full", "exact", "tiled", "patched"])
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME[:WEIGHT]",
        help="built-in name (urae-2k, urae-4k) or .safetensors path; repeatable",
    )
    p.add_argument("--no-preset-adapter", action="store_true", help="do not apply the preset's URAE adapter")
    p.add_argument(
        "--tier", default="quality", choices=["quality", "fast", "turbo"],
        help="quality (default); fast: fp8, GPUs with compute capability >= 8.9; turbo: step cache",
    )
    p.add_argument(
        "--compile", default="auto", choices=["auto", "on", "off"],
        help="compile the transformer blocks (auto: on CUDA)",
    )
    p.add_argument(
        "--image", type=Path,
        help="image to image: start from this picture (PNG, JPEG or WebP), fitted to the size (scaled to cover, "
        "centre-cropped)",
    )
    p.add_argument(
        "--strength", type=float,
        help="with --image: the share of the schedule run over it, 0 < s <= 1 (1: from noise; default 0.45)",
    )
    p.add_argument("-o", "--output", type=Path, default=Path("urae.png"))
    p.add_argument("--format", choices=["png", "jpeg", "webp"], help="default: from the output suffix")
    add_model_arguments(p)
    p.set_defaults(func=cmd_generate)


def _add_refine(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "refine", help="the same picture at a larger size: a draft written by `urae generate`, refined at 2K/4K",
        description="Reads the draft's prompt, seed, adapters and model from the record urae generate embeds in "
        "it, and makes that picture at the target size (image to image at --strength).",
    )
    p.add_argument("draft", type=Path, help="an image written by urae generate (its embedded record is read)")
    p.add_argument("--preset", default="4k", help="target: 2k or 4k (default), the draft's aspect ratio kept")
    p.add_argument("--width", type=int, help="target width instead of the preset's (with --height)")
    p.add_argument("--height", type=int)
    p.add_argument("--strength", type=float, help="0 < s <= 1, the share of the schedule run again (default 0.45)")
    p.add_argument("--steps", type=int, help="the target preset's schedule length (default: the preset's)")
    p.add_argument("--tier", default="quality", choices=["quality", "fast", "turbo"])
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--vae-decode", choices=["auto", "full", "exact", "tiled", "patched"])
    p.add_argument("-o", "--output", type=Path, help="default: the draft's name with -refined")
    p.add_argument("--format", choices=["png", "jpeg", "webp"], help="default: from the output suffix")
    add_model_arguments(p)
    p.set_defaults(func=cmd_refine, model=None)


def cmd_refine(args: argparse.Namespace) -> int:
    """``urae generate`` with the draft's record and the draft as the input image."""
    from urae.adapters.builtin import BUILTIN_ADAPTERS
    from urae.output import read_metadata

    try:
        record = read_metadata(args.draft)
        with Image.open(args.draft) as draft:
            width, height = draft.size
    except FileNotFoundError:
        raise InvalidSpecError("draft", f"{args.draft}: no such file") from None
    except (OSError, ValueError) as exc:
        raise InvalidSpecError("draft", f"{args.draft}: not a readable image ({exc})") from None
    if not isinstance(record.get("prompt"), str) or not isinstance(record.get("seed"), int):
        raise InvalidSpecError(
            "draft", f"{args.draft} holds no generation record (prompt and seed); for any other picture use "
            "urae generate PROMPT --image FILE",
        )
    # The preset's own URAE adapter comes with the target preset; the draft's other adapters are kept.
    kept = [f"{a['name']}:{a['weight']}" for a in record.get("adapters", [])
            if isinstance(a, dict) and a.get("name") not in BUILTIN_ADAPTERS]
    fmt = args.format or "png"
    output = args.output or args.draft.with_name(f"{args.draft.stem}-refined.{'jpg' if fmt == 'jpeg' else fmt}")
    generate_args = argparse.Namespace(
        prompt=record["prompt"], preset=args.preset, aspect_ratio=f"{width}:{height}", width=args.width,
        height=args.height, steps=args.steps, guidance=None, seed=record["seed"], num_images=1,
        max_sequence_length=None, ntk_factor=None, shift=None, vae_decode=args.vae_decode, adapter=kept,
        no_preset_adapter=False, tier=args.tier, compile=args.compile, image=args.draft, strength=args.strength,
        output=output, format=args.format, model=args.model or record.get("model") or _default_model(),
        device=args.device, dtype=args.dtype, offload=args.offload,
    )
    return cmd_generate(generate_args)


def _default_model() -> str:
    return os.environ.get("URAE_MODEL", "black-forest-labs/FLUX.1-dev")


def output_paths(output: Path, count: int, fmt: str) -> list[Path]:
    suffix = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}[fmt]
    base = output if output.suffix else output.with_suffix(suffix)
    if count == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{i}{base.suffix}") for i in range(count)]


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from urae.generate import Generator, Progress
    from urae.output import save_image
    from urae.presets import resolve_spec
    from urae.spec import MAX_SEED, AdapterRef, GenerationSpec

    fmt = args.format or {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(
        args.output.suffix.lower(), "png"
    )
    device, dtype = resolve_device_dtype(args)
    if args.seed is None:
        # As the API does: a fresh seed per run, reported with each image so that it can be repeated.
        args.seed = secrets.randbelow(MAX_SEED)

    def build_spec(schnell: bool) -> GenerationSpec:
        return resolve_spec(
            args.prompt,
            args.preset,
            schnell=schnell,
            aspect_ratio=args.aspect_ratio,
            preset_adapter=not args.no_preset_adapter,
            adapters=[AdapterRef.parse(a) for a in args.adapter],
            width=args.width,
            height=args.height,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            num_images=args.num_images,
            max_sequence_length=args.max_sequence_length,
            ntk_factor=args.ntk_factor,
            shift=args.shift,
            vae_decode=args.vae_decode,
            tier=args.tier,
            strength=args.strength,
            model=args.model,
        )

    checked = build_spec(schnell=False)  # bad input fails here, before a model is loaded
    source = _input_image(args.image, args.strength)
    generator = Generator.load(
        args.model, device=device, dtype=dtype, offload=args.offload, tiers=[args.tier],
        compile={"auto": None, "on": True, "off": False}[args.compile],
        adapter_slots=max(2, len(checked.adapters)),  # one run: a slot for every adapter it mixes
    )
    spec = build_spec(generator.schnell)
    if source is not None and spec.strength is None:
        from urae.spec import DEFAULT_STRENGTH

        spec = replace(spec, strength=DEFAULT_STRENGTH)
    bar = tqdm(total=spec.steps_run() * spec.num_images, desc=f"{spec.width}x{spec.height}", unit="step")

    def on_progress(event: Progress) -> None:
        # The label names the stage running now; only denoising steps move the bar.
        if bar.postfix != event.stage:
            bar.set_postfix_str(event.stage)
        if event.stage == "denoise":
            bar.update(event.step - bar.n)

    try:
        result = generator.generate(spec, on_progress=on_progress, image=source)
    finally:
        bar.close()
    for warning in result.warnings:
        print(f"urae generate: warning: {warning}", file=sys.stderr)
    for path, image, meta in zip(
        output_paths(args.output, spec.num_images, fmt), result.images, result.metadata, strict=True
    ):
        save_image(image, meta, path, fmt)
        print(f"{path}  seed={meta['seed']}")
    return 0


def _input_image(path: Path | None, strength: float | None) -> Image.Image | None:
    """The --image file, read and checked before any model is loaded."""
    if path is None:
        if strength is not None:
            raise InvalidSpecError("strength", "applies to an input image: give one with --image")
        return None
    try:
        with Image.open(path) as opened:
            if opened.format not in ("PNG", "JPEG", "WEBP"):
                raise InvalidSpecError("image", f"{path}: a {opened.format} image; PNG, JPEG and WebP are read")
            if opened.width * opened.height > MAX_INPUT_PIXELS:
                raise InvalidSpecError("image", f"{path}: {opened.width}x{opened.height} is more than "
                                       f"{MAX_INPUT_PIXELS:,} pixels")
            opened.load()
            return opened.convert("RGB")
    except FileNotFoundError:
        raise InvalidSpecError("image", f"{path}: no such file") from None
    except Image.DecompressionBombError as exc:
        raise InvalidSpecError("image", f"{path}: {exc}") from None
    except OSError as exc:
        raise InvalidSpecError("image", f"{path}: not a readable image ({exc})") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="urae", description="FLUX.1 at 2K/4K with URAE: generate, adapt, convert"
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    _add_refine(subparsers)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name):
                raise
            continue
        module.add_parsers(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # transformers warns at import about optional image backends nobody here uses.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except GenerationCanceled as exc:
        print(f"urae {args.command}: {exc}", file=sys.stderr)
        return 130
    except UraeError as exc:
        print(f"urae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"urae {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
