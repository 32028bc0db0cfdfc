"""Writing images: generation metadata embedded, written atomically (temp file + rename)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from urae.errors import InvalidSpecError, OutputWriteError
from urae.file_modes import apply_umask

FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}
METADATA_KEY = "urae"
# zlib level for PNG: chosen by measurement (bench/png_encode.py, BENCHMARKS.md "PNG encoding").
PNG_COMPRESS_LEVEL = 4


def encode_metadata(metadata: dict[str, Any]) -> str:
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"))


def save_image(
    image: Image.Image, metadata: dict[str, Any], path: Path | str, fmt: str = "png",
    png_compress_level: int = PNG_COMPRESS_LEVEL,
) -> Path:
    """Write ``image`` to ``path`` with ``metadata`` embedded; atomic: no partial file on failure.

    PNG carries the record as a text chunk ``urae`` (JSON); JPEG and WebP carry it as the EXIF
    ImageDescription. Read it back with :func:`read_metadata`.
    """
    key = fmt.lower()
    if key not in FORMATS:
        raise InvalidSpecError("output_format", f"{fmt!r} is not one of png, jpeg, webp")
    path = Path(path)
    text = encode_metadata(metadata)
    kwargs: dict[str, Any] = {}
    if FORMATS[key] == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text(METADATA_KEY, text)
        info.add_text("prompt", str(metadata.get("prompt", "")))
        kwargs["pnginfo"] = info
        kwargs["compress_level"] = png_compress_level
    else:
        exif = Image.Exif()
        exif[0x010E] = text  # ImageDescription
        kwargs["exif"] = exif.tobytes()
        kwargs["quality"] = 95
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        apply_umask(tmp_name)
        with os.fdopen(fd, "wb") as handle:
            image.convert("RGB").save(handle, format=FORMATS[key], **kwargs)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as exc:
        raise OutputWriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path


def read_metadata(path: Path | str) -> dict[str, Any]:
    """The generation record embedded by :func:`save_image` ({} if there is none)."""
    with Image.open(path) as image:
        text = image.info.get(METADATA_KEY) if image.format == "PNG" else image.getexif().get(0x010E)
    if not text:
        return {}
    data: dict[str, Any] = json.loads(text)
    return data


def tensor_to_images(decoded: Any) -> list[Image.Image]:
    """VAE output in [-1, 1], (B, 3, H, W) on any device -> PIL images.

    The uint8 conversion runs where the tensor lives (on the GPU: a 4K image crosses to the host as
    48 MiB of bytes instead of 200 MiB of floats, and the host does no per-pixel work). Same rounding
    as diffusers' postprocess: clamp((x + 1) / 2) * 255, rounded half to even, in float32.
    """
    import torch

    pixels = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(a) for a in array]
