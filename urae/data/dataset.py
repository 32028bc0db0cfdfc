"""A training dataset folder: images with captions, checked as a whole before anything is trained.

Two caption formats, one per dataset: a JSON file beside each image (``{"prompt": ...,
"generated_prompt": ...}``, the reference layout: the original prompt plus a longer caption) or a
plain ``.txt`` caption beside each image. Every problem is collected and reported together, so a user
fixes a dataset in one pass and nothing is ever trained on part of it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from urae.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_SUFFIXES = (".json", ".txt")
# Names the dataset tooling itself writes into a dataset folder; never captions.
RESERVED_NAMES = ("manifest.json",)


@dataclass(frozen=True)
class DatasetItem:
    """One training example. ``generated_prompt`` is None when the dataset has a single caption."""

    image: Path
    prompt: str
    generated_prompt: str | None
    width: int
    height: int

    @property
    def key(self) -> str:
        """Stable name of the item inside the dataset (the image file's stem)."""
        return self.image.stem


def scan_dataset(folder: str | Path, min_long_side: int = 64) -> list[DatasetItem]:
    """Read and check a dataset folder; raise :class:`DatasetError` listing every offending file.

    An image whose longer side is below ``min_long_side`` is refused: it would be upscaled too much.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(str(root), [(str(root), "is not a folder")])
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    image_files = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    images = {p.stem: p for p in image_files}
    captions: dict[str, list[Path]] = {}
    for p in files:
        if p.suffix.lower() in CAPTION_SUFFIXES and p.name not in RESERVED_NAMES:
            captions.setdefault(p.stem, []).append(p)
    problems: list[tuple[str, str]] = []
    for p in image_files:
        if images[p.stem] != p:
            problems.append((p.name, f"shares its name with {images[p.stem].name}; one caption cannot serve both"))
    for stem in sorted(set(captions) - set(images)):
        problems.append((captions[stem][0].name, "caption without an image"))
    if not images:
        problems.append((str(root), "contains no images (" + ", ".join(IMAGE_SUFFIXES) + ")"))

    formats = {p.suffix.lower() for stem in images for p in captions.get(stem, [])}
    mixed = len(formats) > 1
    items: list[DatasetItem] = []
    for stem, image in sorted(images.items()):
        found = captions.get(stem, [])
        if not found:
            problems.append((image.name, "no caption (.json or .txt beside it)"))
            continue
        if len(found) > 1:
            problems.append((image.name, "has both a .json and a .txt caption"))
            continue
        if mixed and found[0].suffix.lower() == ".txt":
            # One format per dataset: when both are present, every .txt caption is reported.
            problems.append((found[0].name, "the dataset mixes .json and .txt captions; use one format"))
            continue
        caption = _read_caption(found[0])
        if isinstance(caption, str):
            problems.append((found[0].name, caption))
            continue
        size = _image_size(image)
        if isinstance(size, str):
            problems.append((image.name, size))
            continue
        width, height = size
        if max(width, height) < min_long_side:
            problems.append((image.name, f"is {width}x{height}; the longer side must be at least {min_long_side}"))
            continue
        items.append(DatasetItem(image, caption[0], caption[1], width, height))
    if problems:
        raise DatasetError(str(root), problems)
    return items


def _read_caption(path: Path) -> tuple[str, str | None] | str:
    """The (prompt, generated prompt) pair, or a string saying what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return f"unreadable caption ({exc.__class__.__name__})"
    if path.suffix.lower() == ".txt":
        return (text.strip(), None) if text.strip() else "empty caption"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"invalid JSON ({exc.msg} at line {exc.lineno})"
    if not isinstance(data, dict):
        return "JSON caption must be an object with a 'prompt'"
    prompt = data.get("prompt")
    generated = data.get("generated_prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return "JSON caption has no non-empty 'prompt'"
    if generated is not None and (not isinstance(generated, str) or not generated.strip()):
        return "'generated_prompt' must be a non-empty string when present"
    return prompt.strip(), generated.strip() if generated else None


def _image_size(path: Path) -> tuple[int, int] | str:
    # verify() checks the file's structure without decoding the pixels: scanning thousands of 4K
    # images stays fast. A file that still fails to decode is reported when it is cached.
    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()
        return size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        return f"unreadable image ({exc.__class__.__name__})"


def dataset_hash(items: list[DatasetItem]) -> str:
    """A short hash of the dataset's file names, sizes and captions (recorded in exported adapters)."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.key.encode())
        digest.update(str(item.image.stat().st_size).encode())
        digest.update(item.prompt.encode())
        digest.update((item.generated_prompt or "").encode())
    return digest.hexdigest()[:16]
