"""The world's renderer as a synthetic-data teacher (the protocol of urae.synth.teachers).

The analogue of URAE's FLUX1.1 [Pro] Ultra: a stronger model that draws a caption at the target
resolution. Here it is exact: the caption's scene, rendered at ``size`` pixels.
"""

from __future__ import annotations

import io
from typing import Any

from urae.errors import TeacherError
from urae.synth.teachers import TeacherImage
from urae.world.render import render
from urae.world.scene import CaptionError, scene_for_caption


class WorldTeacher:
    """Renders any world caption at ``size`` x ``size`` pixels (PNG); the seed places the objects."""

    def __init__(self, size: int):
        if size < 64:
            raise ValueError(f"size must be at least 64 pixels, got {size}")
        self.size = size
        self.name = f"world:{size}"

    def settings(self) -> dict[str, Any]:
        return {"size": self.size}

    def generate(self, prompt: str, seed: int) -> TeacherImage:
        try:
            scene = scene_for_caption(prompt, seed)
        except CaptionError as exc:
            raise TeacherError(str(exc)) from None
        buffer = io.BytesIO()
        render(scene, self.size).save(buffer, format="PNG")
        return TeacherImage(buffer.getvalue(), ".png")
