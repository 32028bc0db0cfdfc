"""Synthetic teacher data (URAE guideline 1): a stronger model generates the training images.

The names are imported on first use, so that ``urae.synth.cli`` (built into every ``urae`` command
line) does not pay for loading diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from urae.synth.synthesize import SynthReport, read_prompts, synthesize
    from urae.synth.teachers import (
        BflTeacher,
        LocalTeacher,
        RetryPolicy,
        Teacher,
        TeacherImage,
        TeacherModerated,
    )

_HOMES = {
    "BflTeacher": "urae.synth.teachers",
    "LocalTeacher": "urae.synth.teachers",
    "RetryPolicy": "urae.synth.teachers",
    "SynthReport": "urae.synth.synthesize",
    "Teacher": "urae.synth.teachers",
    "TeacherImage": "urae.synth.teachers",
    "TeacherModerated": "urae.synth.teachers",
    "read_prompts": "urae.synth.synthesize",
    "synthesize": "urae.synth.synthesize",
}

__all__ = [
    "BflTeacher",
    "LocalTeacher",
    "RetryPolicy",
    "SynthReport",
    "Teacher",
    "TeacherImage",
    "TeacherModerated",
    "read_prompts",
    "synthesize",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'urae.synth' has no attribute {name!r}")
