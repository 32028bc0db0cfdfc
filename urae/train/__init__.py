"""URAE adaptation of FLUX.1: training configuration, recipes, the training loop and its export.

The names are imported on first use, so that ``urae.train.cli`` (built into every ``urae`` command
line) does not pay for loading diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from urae.train.config import TrainConfig, load_recipe
    from urae.train.loop import TrainProgress, TrainResult, train

_HOMES = {
    "TrainConfig": "urae.train.config",
    "load_recipe": "urae.train.config",
    "TrainProgress": "urae.train.loop",
    "TrainResult": "urae.train.loop",
    "train": "urae.train.loop",
}

__all__ = ["TrainConfig", "TrainProgress", "TrainResult", "load_recipe", "train"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'urae.train' has no attribute {name!r}")
