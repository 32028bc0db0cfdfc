"""The training configuration: one dataclass with the paper's defaults, and recipes as YAML files."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from urae.errors import InvalidSpecError

ADAPTER_KINDS = ("minor_components", "lora")
OPTIMIZERS = ("adamw", "prodigy")
SCHEDULES = ("constant", "cosine")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
MIXED_PRECISIONS = ("no", "bf16")
DEVICES = ("auto", "cpu")
RESIZE_MODES = ("stretch", "crop")
RESOLUTION_MULTIPLE = 64
# Default learning rates when none is given: Prodigy estimates its own step size (lr is a multiplier).
DEFAULT_LEARNING_RATES = {"adamw": 1e-4, "prodigy": 1.0}


@dataclass(kw_only=True)
class TrainConfig:
    """Everything that determines a training run. Defaults follow the URAE paper's 2K recipe where it
    has one; ``from_dict`` validates and is the way to build one from user input."""

    # Base model: hub id, local diffusers folder, or "tiny"/"tiny-schnell".
    model_id: str = "black-forest-labs/FLUX.1-dev"
    # Folder of images with one .json or .txt caption each (see urae.data.dataset).
    dataset_dir: Path
    # Where checkpoints, samples, the loss log and the final adapter go.
    output_dir: Path
    # Where the embedding/latent cache goes; None: output_dir/"cache".
    cache_dir: Path | None = None
    # Name of the recipe this config came from (recorded in the adapter's metadata).
    recipe: str | None = None
    # A plain LoRA (built-in name such as "urae-2k", or a .safetensors path) fused into the base
    # before training: URAE's 4K run starts from dev + the 2K LoRA. It is part of the export, so the
    # result applies to the ORIGINAL base weights.
    base_adapter: str | None = None
    # "minor_components": SVD init on the r smallest singular components (URAE 4K);
    # "lora": standard LoRA, gaussian A and zero B (URAE 2K).
    adapter_kind: str = "minor_components"
    # Adapter rank r.
    rank: int = 16
    # LoRA alpha; None means alpha = rank (scale 1). Minor components always use scale 1.
    alpha: float | None = None
    # "urae": image-stream to_q/to_k/to_v of every block and to_out.0 of the double blocks (190
    # matrices on FLUX.1); or a list of layer names ("to_q", "to_out.0") or full module paths.
    targets: list[str] | str = "urae"
    # Target long side in pixels (a multiple of 64); images are bucketed at 1:1, 4:3, 2:1, 4:1.
    resolution: int = 2048
    # How an image takes its bucket's size: "stretch" (resize to it, as the reference does: the whole
    # image is kept, its aspect ratio changes a little) or "crop" (cover the bucket, crop the center).
    resize_mode: str = "stretch"
    # T5 tokens of the cached prompt embeddings (FLUX.1-dev: 512).
    max_sequence_length: int = 512
    # Optimizer steps.
    steps: int = 2000
    # None: 1e-4 for AdamW, 1.0 for Prodigy (the paper's setting).
    learning_rate: float | None = None
    # "adamw" or "prodigy" (needs the optional package prodigyopt).
    optimizer: str = "adamw"
    # Weight decay of the optimizer (decoupled: AdamW always, Prodigy with prodigy_decouple).
    weight_decay: float = 1e-4
    # Betas and epsilon of AdamW and Prodigy (the reference: 0.9, 0.999, 1e-8).
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    # Prodigy as the reference runs it: bias correction, safeguard warmup, decoupled weight decay
    # (prodigyopt's own defaults leave the first two off).
    prodigy_use_bias_correction: bool = True
    prodigy_safeguard_warmup: bool = True
    prodigy_decouple: bool = True
    # "constant" or "cosine" (to zero at the last step), both after a linear warmup.
    schedule: str = "constant"
    # Linear warmup steps.
    warmup: int = 0
    # Max gradient norm; 0 disables clipping.
    grad_clip: float = 1.0
    # Images per forward pass and process (all from one aspect bucket).
    batch_size: int = 1
    # Images per optimizer step over all processes; None: batch_size x processes. Gradient
    # accumulation makes up the rest: global_batch_size / (batch_size x processes) passes per step,
    # which must be a whole number. The reference: 8 (1 per GPU on 8 GPUs); on one GPU the recipes
    # then accumulate 8 passes, so every step sees the same number of samples as the reference.
    global_batch_size: int | None = None
    # Guidance embedding value during training: 1 for guidance-distilled models (URAE guideline 3).
    guidance: float = 1.0
    # Sigma distribution: "uniform" (the paper: U(0,1), no shift) or "logit_normal".
    timestep_sampling: str = "uniform"
    # Mean and std of the normal behind "logit_normal".
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # RoPE NTK factor during training (URAE's 4K run: 10).
    ntk_factor: float = 1.0
    # Proportional attention during training (URAE's 4K run: on).
    proportional_attention: bool = False
    # "bf16": frozen weights in bfloat16, autocast, adapter weights in float32; "no": float32.
    mixed_precision: str = "bf16"
    # Recompute block activations in the backward pass (needed at 2K/4K).
    gradient_checkpointing: bool = True
    # Seed of the adapter init, data order, noise and timesteps.
    seed: int = 0
    # Save a resumable checkpoint every N steps (0: only at the end or on cancel).
    checkpoint_every: int = 500
    # Checkpoints kept on disk (older ones are deleted).
    keep_checkpoints: int = 2
    # Render sample_prompts every N steps (0: never).
    sample_every: int = 500
    sample_prompts: list[str] = field(default_factory=list)
    # Denoising steps and guidance of the samples (inference settings, not training ones).
    sample_steps: int = 28
    sample_guidance: float = 3.5
    # Share of steps that use the original "prompt" instead of "generated_prompt" (when both exist).
    real_prompt_ratio: float = 0.2
    # "auto": what accelerate picks (the process's GPU when there is one, under accelerate launch one
    # GPU per process); "cpu": force the CPU.
    device: str = "auto"
    # Continue from the latest checkpoint in output_dir when there is one.
    resume: bool = True
    # Show a progress bar on stderr.
    progress_bar: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build and validate a config; unknown keys and bad values raise InvalidSpecError."""
        if not isinstance(data, dict):
            raise InvalidSpecError("config", "must be a mapping of training parameters")
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise InvalidSpecError(str(key), "is not a training parameter")
        for key in ("dataset_dir", "output_dir"):
            if data.get(key) in (None, ""):
                raise InvalidSpecError(key, "is required")
        values = {key: _coerce(key, value) for key, value in data.items()}
        return cls(**values).validate()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-friendly values (paths as strings)."""
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
        return data

    @property
    def effective_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATES[self.optimizer]

    @property
    def lora_scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def validate(self) -> TrainConfig:
        """Raise InvalidSpecError naming the first bad field; return self when valid."""
        _one_of("adapter_kind", self.adapter_kind, ADAPTER_KINDS)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        _one_of("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        _int_at_least("rank", self.rank, 1)
        _int_at_least("resolution", self.resolution, RESOLUTION_MULTIPLE)
        if self.resolution % RESOLUTION_MULTIPLE:
            raise InvalidSpecError("resolution", f"{self.resolution} is not a multiple of {RESOLUTION_MULTIPLE}")
        _int_at_least("max_sequence_length", self.max_sequence_length, 1)
        _int_at_least("steps", self.steps, 1)
        _int_at_least("warmup", self.warmup, 0)
        _int_at_least("batch_size", self.batch_size, 1)
        if self.global_batch_size is not None:
            _int_at_least("global_batch_size", self.global_batch_size, 1)
            if self.global_batch_size % self.batch_size:
                raise InvalidSpecError(
                    "global_batch_size", f"{self.global_batch_size} is not a multiple of batch_size {self.batch_size}"
                )
        _int_at_least("seed", self.seed, 0)
        _int_at_least("checkpoint_every", self.checkpoint_every, 0)
        _int_at_least("keep_checkpoints", self.keep_checkpoints, 1)
        _int_at_least("sample_every", self.sample_every, 0)
        _int_at_least("sample_steps", self.sample_steps, 1)
        if self.alpha is not None:
            _positive("alpha", self.alpha)
            if self.adapter_kind == "minor_components" and self.alpha != self.rank:
                raise InvalidSpecError("alpha", "minor components use no extra scale; leave alpha unset")
        if self.learning_rate is not None:
            _positive("learning_rate", self.learning_rate)
        _in_range("weight_decay", self.weight_decay, 0.0, 1.0)
        _in_range("adam_beta1", self.adam_beta1, 0.0, 1.0 - 1e-9)
        _in_range("adam_beta2", self.adam_beta2, 0.0, 1.0 - 1e-9)
        _in_range("adam_epsilon", self.adam_epsilon, 1e-30, 1.0)
        _one_of("resize_mode", self.resize_mode, RESIZE_MODES)
        _in_range("grad_clip", self.grad_clip, 0.0, math.inf)
        _in_range("guidance", self.guidance, 0.0, 30.0)
        _in_range("sample_guidance", self.sample_guidance, 0.0, 30.0)
        _in_range("logit_std", self.logit_std, 1e-3, 10.0)
        _in_range("logit_mean", self.logit_mean, -10.0, 10.0)
        _in_range("ntk_factor", self.ntk_factor, 1.0, 100.0)
        _in_range("real_prompt_ratio", self.real_prompt_ratio, 0.0, 1.0)
        if isinstance(self.targets, str):
            if not self.targets.strip():
                raise InvalidSpecError("targets", "is empty")
        elif not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise InvalidSpecError("targets", "must be 'urae' or a non-empty list of layer names")
        if not all(isinstance(p, str) and p.strip() for p in self.sample_prompts):
            raise InvalidSpecError("sample_prompts", "must be a list of non-empty strings")
        _one_of("device", self.device, DEVICES)
        return self

    def accumulation_steps(self, num_processes: int) -> int:
        """Forward/backward passes per optimizer step and process, for ``global_batch_size``."""
        if self.global_batch_size is None:
            return 1
        per_pass = self.batch_size * num_processes
        if self.global_batch_size % per_pass:
            raise InvalidSpecError(
                "global_batch_size",
                f"{self.global_batch_size} is not a multiple of batch_size x processes "
                f"({self.batch_size} x {num_processes})",
            )
        return self.global_batch_size // per_pass

    def optimizer_settings(self) -> dict[str, Any]:
        """The keyword arguments the optimizer is built with (besides the parameters)."""
        settings: dict[str, Any] = {
            "lr": self.effective_learning_rate,
            "betas": (self.adam_beta1, self.adam_beta2),
            "eps": self.adam_epsilon,
            "weight_decay": self.weight_decay,
        }
        if self.optimizer == "prodigy":
            settings.update(
                use_bias_correction=self.prodigy_use_bias_correction,
                safeguard_warmup=self.prodigy_safeguard_warmup,
                decouple=self.prodigy_decouple,
            )
        return settings

    def resolved_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.output_dir / "cache"


_PATH_FIELDS = ("dataset_dir", "output_dir", "cache_dir")
_BOOL_FIELDS = (
    "proportional_attention",
    "gradient_checkpointing",
    "resume",
    "progress_bar",
    "prodigy_use_bias_correction",
    "prodigy_safeguard_warmup",
    "prodigy_decouple",
)
_FLOAT_FIELDS = (
    "alpha",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "grad_clip",
    "guidance",
    "logit_mean",
    "logit_std",
    "ntk_factor",
    "sample_guidance",
    "real_prompt_ratio",
)
_STR_FIELDS = ("model_id", "recipe", "base_adapter", "adapter_kind", "optimizer", "schedule", "timestep_sampling", "mixed_precision", "device", "resize_mode")


def is_string_field(key: str) -> bool:
    """True for parameters whose value is text (the CLI then takes --set values verbatim)."""
    return key in _STR_FIELDS or key in _PATH_FIELDS


def _coerce(key: str, value: Any) -> Any:
    """Check a raw value's type (YAML/JSON/CLI input) and convert paths and numbers."""
    if value is None:
        if key in ("cache_dir", "recipe", "base_adapter", "alpha", "learning_rate", "global_batch_size"):
            return None
        raise InvalidSpecError(key, "must not be empty")
    if key in _PATH_FIELDS:
        if not isinstance(value, str | Path):
            raise InvalidSpecError(key, f"must be a path, got {value!r}")
        return Path(value)
    if key in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise InvalidSpecError(key, f"must be true or false, got {value!r}")
        return value
    if key in _FLOAT_FIELDS:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-4` (no dot) as text.
            value = _parse_number(key, value)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidSpecError(key, f"must be a finite number, got {value!r}")
        return float(value)
    if key == "mixed_precision" and value is False:
        # YAML 1.1 reads an unquoted `no` as false.
        return "no"
    if key in _STR_FIELDS:
        if not isinstance(value, str):
            raise InvalidSpecError(key, f"must be a string, got {value!r}")
        return value
    if key == "targets":
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            return [str(v) for v in value]
        raise InvalidSpecError(key, f"must be 'urae' or a list of layer names, got {value!r}")
    if key == "sample_prompts":
        if not isinstance(value, list):
            raise InvalidSpecError(key, "must be a list of prompts")
        return value
    # Every remaining field is an integer.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpecError(key, f"must be an integer, got {value!r}")
    return value


def _parse_number(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidSpecError(key, f"must be a finite number, got {text!r}") from None


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidSpecError(name, f"{value!r} is not one of {', '.join(allowed)}")


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidSpecError(name, f"must be an integer >= {low}, got {value!r}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise InvalidSpecError(name, f"must be positive, got {value!r}")


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidSpecError(name, f"{value!r} is outside {low}..{high}")


def recipe_folders() -> list[Path]:
    """Where recipe names are looked up: the package's copy, then the source tree's recipes/."""
    here = Path(__file__).resolve().parent
    return [here / "recipes", here.parents[1] / "recipes"]


def load_recipe(path_or_name: str) -> dict[str, Any]:
    """A recipe's settings as a dict: a YAML file path, or a shipped name such as ``urae-2k``."""
    candidates = [Path(path_or_name)]
    if not path_or_name.endswith((".yaml", ".yml")):
        candidates += [folder / f"{path_or_name}.yaml" for folder in recipe_folders()]
    for path in candidates:
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError as exc:
                raise InvalidSpecError("recipe", f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
            if not isinstance(data, dict):
                raise InvalidSpecError("recipe", f"{path} must hold a mapping of training parameters")
            return data
    names = sorted({p.stem for folder in recipe_folders() if folder.is_dir() for p in folder.glob("*.yaml")})
    raise InvalidSpecError("recipe", f"{path_or_name!r} is neither a file nor a recipe name ({', '.join(names)})")
