"""``urae train``: run a training from a recipe or config file, with overrides on the command line."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from urae.errors import InvalidSpecError


def add_parsers(subparsers: Any) -> None:
    """Register the ``train`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "train",
        help="URAE adaptation (LoRA or minor components) on a dataset folder; resumable",
        description="Settings come from --config (a YAML file or a recipe name: urae-2k, urae-4k), "
        "then the flags, then every --set key=value (YAML values: --set rank=32 --set targets=[to_q,to_k]).",
    )
    parser.add_argument("--config", help="YAML config file or recipe name (urae-2k, urae-4k)")
    parser.add_argument("--dataset", dest="dataset_dir", help="folder of images with .json or .txt captions")
    parser.add_argument("--output", dest="output_dir", help="folder for checkpoints, samples, log and adapter")
    parser.add_argument("--model", dest="model_id", help="base model id, folder, or tiny / tiny-schnell")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--fresh", action="store_true", help="ignore and delete existing checkpoints")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="any training parameter"
    )
    parser.set_defaults(func=run_train)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The raw settings of ``args``: recipe, then flags, then --set overrides (later wins)."""
    from urae.train.config import is_string_field, load_recipe

    data: dict[str, Any] = {}
    if args.config:
        data.update(load_recipe(args.config))
    for key in ("dataset_dir", "output_dir", "model_id", "steps"):
        value = getattr(args, key)
        if value is not None:
            data[key] = value
    if args.fresh:
        data["resume"] = False
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InvalidSpecError("set", f"{item!r} is not of the form key=value")
        key = key.strip()
        if is_string_field(key) and raw.strip():
            data[key] = raw  # verbatim: YAML would turn `no` into false and `1.0` into a number
            continue
        try:
            data[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise InvalidSpecError(key, f"{raw!r} is not a valid value") from None
    return data


def run_train(args: argparse.Namespace) -> int:
    """Handler of ``urae train``; errors propagate as UraeError (the main CLI prints one line)."""
    from urae.train import TrainConfig, train

    config = TrainConfig.from_dict(config_from_args(args))
    result = train(config)
    print(f"adapter: {result.adapter_path}")
    print(f"steps: {result.steps}  final loss: {result.final_loss:.4f}  loss log: {result.loss_log}")
    return 0
