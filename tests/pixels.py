"""Comparing computed images: two model loads or processes may pick different CPU kernels, so pixels
computed independently agree to within one uint8 step, not bitwise."""

from __future__ import annotations

from typing import Any

import numpy as np


def max_pixel_diff(a: Any, b: Any) -> int:
    """Largest absolute difference between two images (PIL images or uint8 arrays) of the same shape."""
    left = np.asarray(a, dtype=np.int16)
    right = np.asarray(b, dtype=np.int16)
    assert left.shape == right.shape, (left.shape, right.shape)
    return int(np.abs(left - right).max())
