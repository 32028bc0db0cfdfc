"""An automatic judge of world images: colour segmentation and connected components, no learning.

From an image and its caption it finds the objects (saturated pixels of a palette hue; backgrounds
are grey), classifies each connected component by its fill of its bounding box (square ~1, circle
~pi/4, triangle ~1/2), and scores: the count of each kind, the colours, duplicated objects (more
than asked), fragmented ones (pieces much smaller than the scene's objects, or shapeless blobs), and edge sharpness (how many pixels
wide the antialiased border between object and background is; an exact rendering has about one at
any resolution, an upscaled or blurred one more).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from urae.world.scene import COLOURS, Expectation, parse_caption

# Pixels whose chroma (max - min of RGB) reaches this share of their palette colour's chroma are
# object pixels; the antialiased border lies between EDGE_LOW and EDGE_HIGH.
OBJECT_ALPHA = 0.5
EDGE_LOW, EDGE_HIGH = 0.15, 0.85
# Hue tolerance around each palette colour, in degrees; other saturated hues are no colour.
HUE_TOLERANCE = 40.0
MIN_CHROMA = 30.0
# A component is an object from this share of the image's area (and at least MIN_OBJECT_PIXELS); the
# smallest object the world draws covers 1.3 %. Smaller pieces from MIN_FRAGMENT_PIXELS are fragments.
MIN_OBJECT_SHARE = 0.0005
MIN_OBJECT_PIXELS = 24
MIN_FRAGMENT_PIXELS = 6
# Fill of the bounding box, per shape; a component outside every band, or far from square, is a blob.
FILL_BANDS = {"square": (0.86, 1.01), "circle": (0.64, 0.86), "triangle": (0.36, 0.62)}
MAX_ASPECT = 1.45
# Background: grey pixels' brightness varies by less than this for a plain one; a textured one is
# striped when its row means carry most of the variance (checks average out along a row).
PLAIN_STD = 12.0
STRIPED_ROW_SHARE = 0.6
# Every object of a world scene has the same size: a component whose bounding box side is below this
# share of the largest one's is a piece of an object (a quarter of a cut circle is itself round).
MIN_SIDE_OF_LARGEST = 0.7
# World objects stand apart by at least 0.15 of their size; same-colour components closer than this
# share of their size are the pieces of one broken object.
MIN_GAP_OF_SIDE = 0.1
# An exact rendering measures 0.6-1.1 px at every resolution; a 1.5 px gaussian blur about 3.
SHARP_EDGE_WIDTH = 1.5


def _hue_and_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high = rgb.max(axis=-1)
    chroma = high - rgb.min(axis=-1)
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        high == r, ((g - b) / safe) % 6, np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    return hue * 60.0, chroma


_PALETTE = {name: _hue_and_chroma(np.asarray(rgb, dtype=np.float64)) for name, rgb in COLOURS.items()}


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str  # circle, square, triangle, or "blob" when it is none of them
    pixels: int
    fill: float
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


@dataclass(frozen=True)
class Verdict:
    expected: Expectation
    objects: tuple[DetectedObject, ...]  # well-formed objects and blobs, every colour
    fragments: int  # pieces too small to be an object
    counts_correct: bool  # exactly the asked number of each kind, nothing else
    colours_correct: bool  # the asked colours and no other
    duplicated: bool  # more objects than asked (of a kind, or in all)
    fragmented: bool  # fragments or shapeless blobs
    edge_width: float  # pixels of antialiased border per pixel of object outline (nan: no object)
    background: str = ""  # white, black, striped or checkered: what the grey pixels look like

    @property
    def background_correct(self) -> bool:
        return self.background == self.expected.background

    @property
    def correct(self) -> bool:
        """The image shows what the caption says."""
        return self.counts_correct and self.colours_correct and not self.fragmented

    @property
    def sharp(self) -> bool:
        """Object borders as crisp as an exact rendering's (about one pixel of antialiasing)."""
        return self.edge_width <= SHARP_EDGE_WIDTH

    @property
    def found(self) -> Counter[tuple[str, str]]:
        return Counter((o.colour, o.shape) for o in self.objects)


def judge(image: Image.Image | np.ndarray, caption: str) -> Verdict:
    """Score ``image`` against a world ``caption`` (CaptionError when it is not one)."""
    expected = parse_caption(caption)
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    height, width = rgb.shape[:2]
    hue, chroma = _hue_and_chroma(rgb)
    min_object = max(MIN_OBJECT_PIXELS, int(MIN_OBJECT_SHARE * width * height))
    objects: list[DetectedObject] = []
    fragments = 0
    edge_pixels = outline_pixels = 0
    structure = np.ones((3, 3), dtype=bool)
    for name, (palette_hue, palette_chroma) in _PALETTE.items():
        distance = np.abs((hue - palette_hue + 180.0) % 360.0 - 180.0)
        alpha = np.where((distance <= HUE_TOLERANCE) & (chroma >= MIN_CHROMA * 0.5), chroma / palette_chroma, 0.0)
        mask = alpha >= OBJECT_ALPHA
        if not mask.any():
            continue
        labels, count = ndimage.label(mask, structure=structure)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        boxes = ndimage.find_objects(labels)
        for index, box in enumerate(boxes, start=1):
            if box is None:
                continue
            pixels = int(sizes[index])
            if pixels < MIN_FRAGMENT_PIXELS:
                continue
            if pixels < min_object:
                fragments += 1
                continue
            ys, xs = box
            box_w, box_h = xs.stop - xs.start, ys.stop - ys.start
            fill = pixels / (box_w * box_h)
            shape = _classify(fill, box_w / box_h)
            objects.append(DetectedObject(name, shape, pixels, fill, (xs.start, ys.start, xs.stop, ys.stop)))
        outline = mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)
        near = ndimage.binary_dilation(mask, structure=structure, iterations=3)
        edge_pixels += int(((alpha > EDGE_LOW) & (alpha < EDGE_HIGH) & near).sum())
        outline_pixels += int(outline.sum())
    broken = _touching_pieces(objects)
    fragments += len(broken)
    objects = [o for o in objects if o not in broken]
    largest = max((max(o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1]) for o in objects), default=0)
    pieces = [o for o in objects if max(o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1]) < MIN_SIDE_OF_LARGEST * largest]
    fragments += len(pieces)
    objects = [o for o in objects if o not in pieces]
    found = Counter((o.colour, o.shape) for o in objects)
    asked = Counter({(g.colour, g.shape): g.count for g in expected.groups})
    duplicated = len(objects) > expected.total or any(found[kind] > n for kind, n in asked.items())
    return Verdict(
        expected=expected,
        objects=tuple(objects),
        fragments=fragments,
        counts_correct=found == asked,
        colours_correct={o.colour for o in objects} == set(expected.colours),
        duplicated=duplicated,
        fragmented=fragments > 0 or any(o.shape == "blob" for o in objects),
        edge_width=edge_pixels / outline_pixels if outline_pixels else math.nan,
        background=_background(rgb, chroma),
    )


def _background(rgb: np.ndarray, chroma: np.ndarray) -> str:
    grey = chroma < MIN_CHROMA
    if grey.sum() < 0.2 * grey.size:
        return "unknown"
    light = rgb.mean(axis=-1)
    values = light[grey]
    if values.std() < PLAIN_STD:
        return "white" if values.mean() > 128 else "black"
    masked = np.where(grey, light, np.nan)
    counts = grey.sum(axis=1)
    rows = np.nanmean(masked[counts > 0], axis=1)
    row_share = float(np.var(np.repeat(rows, counts[counts > 0])) / np.var(values))
    return "striped" if row_share > STRIPED_ROW_SHARE else "checkered"


def _touching_pieces(objects: list[DetectedObject]) -> list[DetectedObject]:
    """Components of one colour separated by a sliver: the pieces of one broken object."""
    pieces = []
    for a in objects:
        for b in objects:
            if a is b or a.colour != b.colour:
                continue
            gap = max(a.bbox[0] - b.bbox[2], b.bbox[0] - a.bbox[2], a.bbox[1] - b.bbox[3], b.bbox[1] - a.bbox[3])
            side = min(max(o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1]) for o in (a, b))
            if gap < max(1.5, MIN_GAP_OF_SIDE * side):
                pieces.append(a)
                break
    return pieces


def _classify(fill: float, aspect: float) -> str:
    if not (1 / MAX_ASPECT <= aspect <= MAX_ASPECT):
        return "blob"
    for shape, (low, high) in FILL_BANDS.items():
        if low <= fill < high:
            return shape
    return "blob"
