"""Scenes of the procedural world: a few shapes of a few colours on a background, with a caption.

A scene lives in normalised coordinates (the image is the unit square, y down), so the same scene
renders exactly at any resolution (see :mod:`urae.world.render`). Everything is a pure function of a
seed: :func:`sample_scene` draws with its own ``random.Random``.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle")
# Saturated, well separated hues: the judge tells them apart by hue alone.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (35, 165, 65),
    "blue": (40, 85, 225),
    "yellow": (240, 200, 30),
}
# Backgrounds are grey (no chroma): object pixels are the saturated ones.
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "white": ((242, 242, 242), (242, 242, 242)),
    "black": ((28, 28, 28), (28, 28, 28)),
    "striped": ((236, 236, 236), (175, 175, 175)),
    "checkered": ((236, 236, 236), (175, 175, 175)),
}
LAYOUTS = ("scattered", "row", "column")
# Stripes and checks per image side.
TEXTURE_PERIODS = 8
MAX_OBJECTS = 4
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
_WORD_NUMBERS = {word: n for n, word in NUMBER_WORDS.items()} | {"one": 1, "an": 1}
# Scene seeds of held-out captions (the benchmark and the semantic tests); training draws elsewhere.
EVALUATION_SEED = 9_000_000
_LAYOUT_PHRASES = {"row": "in a row", "column": "in a column", "scattered": ""}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    cx: float  # centre, in units of the image side
    cy: float
    size: float  # side of the (square) bounding box, in units of the image side


@dataclass(frozen=True)
class Group:
    """``count`` objects of one kind: what a caption asks for."""

    count: int
    colour: str
    shape: str


@dataclass(frozen=True)
class Scene:
    background: str
    layout: str
    objects: tuple[SceneObject, ...]

    @property
    def groups(self) -> tuple[Group, ...]:
        """The objects counted by kind, in order of first appearance."""
        counts: dict[tuple[str, str], int] = {}
        for obj in self.objects:
            counts[(obj.colour, obj.shape)] = counts.get((obj.colour, obj.shape), 0) + 1
        return tuple(Group(n, colour, shape) for (colour, shape), n in counts.items())

    @property
    def caption(self) -> str:
        return caption_for(self.groups, self.layout, self.background)


def caption_for(groups: tuple[Group, ...], layout: str, background: str) -> str:
    """``two red circles and a blue square in a row on a striped background``."""
    parts = [f"{NUMBER_WORDS[g.count]} {g.colour} {g.shape}{'s' if g.count > 1 else ''}" for g in groups]
    text = " and ".join(parts)
    if sum(g.count for g in groups) > 1 and _LAYOUT_PHRASES[layout]:
        text += " " + _LAYOUT_PHRASES[layout]
    return f"{text} on a {background} background"


@dataclass(frozen=True)
class Expectation:
    """What a caption asks for: the judge's reference."""

    groups: tuple[Group, ...]
    layout: str
    background: str

    @property
    def total(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def colours(self) -> frozenset[str]:
        return frozenset(g.colour for g in self.groups)


class CaptionError(ValueError):
    """A caption that is not in the world's language."""


_GROUP = re.compile(r"^(a|an|one|two|three|four) (\w+) (circle|square|triangle)(s?)$")
_CAPTION = re.compile(r"^(?P<groups>.+?)(?: in a (?P<layout>row|column))? on an? (?P<bg>\w+) background$")


def parse_caption(caption: str) -> Expectation:
    """The groups, layout and background a world caption asks for; :class:`CaptionError` otherwise."""
    match = _CAPTION.match(" ".join(caption.lower().split()))
    if match is None:
        raise CaptionError(f"{caption!r} is not a world caption ('... on a <background> background')")
    background = match["bg"]
    if background not in BACKGROUNDS:
        raise CaptionError(f"{caption!r}: unknown background {background!r}")
    groups = []
    for part in match["groups"].split(" and "):
        found = _GROUP.match(part.strip())
        if found is None or found[2] not in COLOURS:
            raise CaptionError(f"{caption!r}: {part!r} is not '<number> <colour> <shape>'")
        groups.append(Group(_WORD_NUMBERS[found[1]], found[2], found[3]))
    return Expectation(tuple(groups), match["layout"] or "scattered", background)


def sample_scene(seed: int) -> Scene:
    """A random scene: 1-4 objects of one or two kinds, a layout and a background."""
    rng = random.Random(seed)
    total = rng.randint(1, MAX_OBJECTS)
    kinds = 1 if total == 1 else rng.choice((1, 2))
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = rng.sample(pairs, kinds)
    counts = [total] if kinds == 1 else _split(total, rng)
    labels = [pair for pair, n in zip(chosen, counts, strict=True) for _ in range(n)]
    rng.shuffle(labels)
    layout = "scattered" if total == 1 else rng.choice(LAYOUTS)
    background = rng.choice(list(BACKGROUNDS))
    size = _fitting_size(rng.uniform(0.2, 0.3) if total <= 2 else rng.uniform(0.16, 0.21), total, layout)
    centres = _place(total, size, layout, rng)
    objects = tuple(
        SceneObject(shape, colour, cx, cy, size) for (colour, shape), (cx, cy) in zip(labels, centres, strict=True)
    )
    return Scene(background, layout, objects)


def evaluation_captions(count: int) -> list[str]:
    """The first ``count`` held-out captions, the same everywhere."""
    return [sample_scene(EVALUATION_SEED + i).caption for i in range(count)]


def scene_for_caption(caption: str, seed: int) -> Scene:
    """A scene that shows exactly what ``caption`` says, its sizes and positions drawn from ``seed``.

    The teacher's side of the world: any world caption, not only one that :func:`sample_scene` made,
    becomes a picture (:class:`CaptionError` for anything else).
    """
    expected = parse_caption(caption)
    total = expected.total
    if total > MAX_OBJECTS:
        raise CaptionError(f"{caption!r} asks for {total} objects; the world draws at most {MAX_OBJECTS}")
    rng = random.Random(seed)
    # Objects in the caption's order (so that the scene's caption is this one), places shuffled.
    labels = [(g.colour, g.shape) for g in expected.groups for _ in range(g.count)]
    size = _fitting_size(rng.uniform(0.2, 0.3) if total <= 2 else rng.uniform(0.16, 0.21), total, expected.layout)
    centres = _place(total, size, expected.layout, rng)
    rng.shuffle(centres)
    objects = tuple(
        SceneObject(shape, colour, cx, cy, size) for (colour, shape), (cx, cy) in zip(labels, centres, strict=True)
    )
    return Scene(expected.background, expected.layout, objects)


def _fitting_size(size: float, n: int, layout: str) -> float:
    """The size, shrunk where a row or column of ``n`` would leave less than 0.35 of it between objects."""
    if layout == "scattered" or n < 2:
        return size
    # n sizes and n - 1 gaps of 0.35 size within 1 - 2 * 0.06 of the side.
    return min(size, 0.88 / (1.35 * (n - 1) + 1))


def _split(total: int, rng: random.Random) -> list[int]:
    first = rng.randint(1, total - 1)
    return [first, total - first]


def _place(n: int, size: float, layout: str, rng: random.Random) -> list[tuple[float, float]]:
    margin = 0.06 + size / 2
    if layout in ("row", "column"):
        along_lo, along_hi = margin, 1 - margin
        step = (along_hi - along_lo) / max(n - 1, 1)
        # At least a gap of a quarter size between neighbours: shrink the span to what n needs.
        span = min(along_hi - along_lo, (n - 1) * max(step, size * 1.35))
        start = rng.uniform(along_lo, along_hi - span) if n > 1 else 0.5
        across = rng.uniform(margin, 1 - margin)
        along = [start + span * i / max(n - 1, 1) for i in range(n)]
        return [(a, across) if layout == "row" else (across, a) for a in along]
    centres: list[tuple[float, float]] = []
    gap = size * 1.3
    tries = 0
    while len(centres) < n:
        candidate = (rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin))
        # Apart by a gap, and never touching: squares side by side need the gap along an axis too.
        if all(math.dist(candidate, c) >= gap and max(abs(candidate[0] - c[0]), abs(candidate[1] - c[1])) >= size * 1.15
               for c in centres):
            centres.append(candidate)
        tries += 1
        if tries % 100 == 0:  # the first objects left no room: start over
            centres = []
    return centres
