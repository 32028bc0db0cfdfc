"""Resumable checkpoints: adapter weights, optimizer and schedule state, written atomically.

``output_dir/checkpoints/step-000500/`` holds ``adapter.safetensors`` (the trainable tensors) and
``state.pt`` (optimizer, LR schedule, step, the settings that must match to resume). The folder is
written under a temporary name and renamed, so a crash never leaves a half checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "step-"
# Settings that change the loss curve; a checkpoint made with other values cannot be resumed.
RESUME_KEYS = (
    "model_id",
    "base_adapter",
    "adapter_kind",
    "rank",
    "alpha",
    "targets",
    "resolution",
    "max_sequence_length",
    "learning_rate",
    "optimizer",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "prodigy_use_bias_correction",
    "prodigy_safeguard_warmup",
    "prodigy_decouple",
    "schedule",
    "warmup",
    "batch_size",
    "global_batch_size",
    "resize_mode",
    "guidance",
    "timestep_sampling",
    "logit_mean",
    "logit_std",
    "ntk_factor",
    "proportional_attention",
    "mixed_precision",
    "seed",
    "real_prompt_ratio",
)


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, folder), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        suffix = path.name[len(CHECKPOINT_PREFIX) :]
        if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and (path / "state.pt").is_file():
            found.append((int(suffix), path))
    return sorted(found)


def save_checkpoint(
    output_dir: Path,
    step: int,
    adapter_state: dict[str, torch.Tensor],
    training_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write the checkpoint of ``step`` and delete all but the newest ``keep``."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(adapter_state, str(tmp / "adapter.safetensors"))
    torch.save(training_state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter tensors, training state) of a checkpoint folder."""
    adapter = load_file(str(folder / "adapter.safetensors"))
    # Our own file: optimizer state holds plain tensors and numbers, but not only tensors.
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    return adapter, state
