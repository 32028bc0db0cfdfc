"""Synthetic teacher data (URAE guideline 1): a stronger model generates the training images."""

from urae.synth.synthesize import SynthReport, read_prompts, synthesize
from urae.synth.teachers import BflTeacher, LocalTeacher, RetryPolicy, Teacher, TeacherImage, TeacherModerated

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
