"""Aspect buckets: every training image is resized to the nearest bucket.

URAE's reference buckets are 1:1, 4:3, 2:1 and 4:1 (both orientations) with the longer side at the
target resolution, and the reference resizes an image to its bucket's size (a stretch: the whole image
is kept, its aspect ratio moves to the bucket's). Cropping the center instead is an option. Sides are
multiples of 64 so that latents pack into 2x2 patches at any VAE scale.
"""

from __future__ import annotations

import math

from PIL import Image

from urae.errors import InvalidSpecError

BUCKET_MULTIPLE = 64
BUCKET_RATIOS = ((1, 1), (4, 3), (2, 1), (4, 1))
RESIZE_MODES = ("stretch", "crop")


def bucket_sizes(long_side: int) -> list[tuple[int, int]]:
    """(width, height) of every bucket at ``long_side``; landscape and portrait, no duplicates."""
    if long_side % BUCKET_MULTIPLE or long_side < BUCKET_MULTIPLE:
        raise InvalidSpecError("resolution", f"{long_side} is not a positive multiple of {BUCKET_MULTIPLE}")
    sizes: list[tuple[int, int]] = []
    for a, b in BUCKET_RATIOS:
        short = max(BUCKET_MULTIPLE, round(long_side * b / a / BUCKET_MULTIPLE) * BUCKET_MULTIPLE)
        for size in ((long_side, short), (short, long_side)):
            if size not in sizes:
                sizes.append(size)
    return sizes


def nearest_bucket(width: int, height: int, long_side: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log scale) to the image's."""
    ratio = math.log(width / height)
    return min(bucket_sizes(long_side), key=lambda s: abs(math.log(s[0] / s[1]) - ratio))


def fit_to_bucket(image: Image.Image, size: tuple[int, int], mode: str = "stretch") -> Image.Image:
    """``image`` at the bucket's ``size``: ``stretch`` resizes it to exactly that size (the reference);
    ``crop`` resizes it to cover the size, keeping its aspect ratio, and crops the center."""
    if mode not in RESIZE_MODES:
        raise InvalidSpecError("resize_mode", f"{mode!r} is not one of {', '.join(RESIZE_MODES)}")
    width, height = size
    if mode == "stretch":
        return image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    scale = max(width / image.width, height / image.height)
    resized = image.convert("RGB").resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))),
        Image.Resampling.LANCZOS,
    )
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))
