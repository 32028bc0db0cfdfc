"""Exceptions of the urae library. Edges (CLI, HTTP) translate these into messages and codes."""

from __future__ import annotations


class UraeError(Exception):
    """Base class of every error the library raises on purpose."""


class InvalidSpecError(UraeError, ValueError):
    """A generation or training parameter is out of bounds. ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class ModelLoadError(UraeError):
    """The base model could not be found or loaded."""


class AdapterError(UraeError):
    """An adapter file is unusable. Subclasses say why; the message names the file and the problem."""


class GenerationCanceled(UraeError):
    """Raised from the denoising loop when the caller asked to stop; no image is decoded."""

    def __init__(self, step: int, total: int):
        super().__init__(f"canceled after step {step} of {total}")
        self.step = step
        self.total = total


class OutputWriteError(UraeError):
    """An output file could not be written; nothing partial is left behind."""


class DatasetError(UraeError):
    """A training dataset is unusable. ``problems`` lists every offending file with its reason."""

    def __init__(self, folder: str, problems: list[tuple[str, str]]):
        lines = [f"{name}: {reason}" for name, reason in problems]
        super().__init__(f"dataset {folder} has {len(problems)} problem(s): " + "; ".join(lines))
        self.folder = folder
        self.problems = problems


class TrainingCanceled(UraeError):
    """Raised at a step boundary when the caller asked training to stop; a checkpoint is kept."""

    def __init__(self, step: int, total: int):
        super().__init__(f"training canceled after step {step} of {total}")
        self.step = step
        self.total = total


class TeacherError(UraeError):
    """The teacher model (remote API or local pipeline) could not produce an image."""


class AdapterNotFoundError(AdapterError):
    """No adapter file at the given path, or no built-in adapter of that name."""


class AdapterDownloadError(AdapterError):
    """A built-in adapter could not be fetched from the model hub."""


class NotSafetensorsError(AdapterError):
    """The file is not a safetensors file (a pickle, .bin or .pt checkpoint is never unpickled)."""


class TruncatedAdapterError(AdapterError):
    """The file ends before the data its header describes."""


class HeaderSizeError(AdapterError):
    """The header length field is absurd or points beyond the end of the file."""


class HeaderFormatError(AdapterError):
    """The header is not valid JSON or does not describe tensors the safetensors way."""


class UnknownKeysError(AdapterError):
    """Tensor names that are neither LoRA nor URAE minor-component keys of a FLUX transformer."""


class TensorDtypeError(AdapterError):
    """A tensor has a dtype other than float16, bfloat16 or float32."""


class TensorShapeError(AdapterError):
    """A tensor has the wrong number of dimensions or an impossible shape."""


class RankMismatchError(AdapterError):
    """The A (down) and B (up) matrices of a module disagree on the rank, or one of them is missing."""


class NonFiniteWeightsError(AdapterError):
    """A tensor contains NaN or infinity."""


class BaseModelMismatchError(AdapterError):
    """The adapter was made for another base model: a module is missing or its shape does not fit."""


class AdapterFormatError(AdapterError):
    """The adapter has the wrong format for this operation (e.g. an unconverted minor-component file)."""


class HotswapRankError(AdapterError):
    """The adapter's rank exceeds the hot-swap target rank the pipeline was prepared with."""


class AdapterNotLoadedError(AdapterError):
    """An adapter name was used that is not resident in the pipeline."""


class AdapterLoadError(AdapterError):
    """A validated adapter still failed to load into the pipeline; it was removed again."""


class TierUnavailableError(InvalidSpecError):
    """The requested speed tier cannot run here (e.g. fp8 on a device without it). ``field`` is tier."""

    def __init__(self, message: str):
        super().__init__("tier", message)
