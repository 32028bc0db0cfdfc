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
