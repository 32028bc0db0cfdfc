"""URAE adaptation of FLUX.1: training configuration, recipes, the training loop and its export."""

from urae.train.config import TrainConfig, load_recipe
from urae.train.loop import TrainProgress, TrainResult, train

__all__ = ["TrainConfig", "TrainProgress", "TrainResult", "load_recipe", "train"]
