"""Input images of image-to-image requests: a ``data:`` URL checked before anything is stored or queued.

Checked in this order, each refusal naming the field ``image``: the URL's form and media type (png,
jpeg, webp), its size (before base64 is decoded), the base64 itself, the file's magic bytes against
the declared type, then its header read by Pillow WITHOUT decoding a pixel, whose declared size must
be within MAX_INPUT_IMAGE_PIXELS (a decompression bomb is refused from its header).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image

from jobstore.contract import INPUT_IMAGE_TYPES, MAX_INPUT_IMAGE_PIXELS
from service.admission import ApiError

FIELD = "image"
# data:<type>[;param=value]*;base64,<data>
_DATA_URL_RE = re.compile(r"^data:([a-z0-9.+-]+/[a-z0-9.+-]+)((?:;[a-z0-9-]+=[^;,]*)*);base64,", re.IGNORECASE)
_BASE64_RE = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")
# Pillow's name of each format.
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class InputImageFile:
    """A checked input image: its bytes, format (png, jpeg, webp) and declared size."""

    data: bytes
    fmt: str
    width: int
    height: int


def _refuse(message: str, status: int = 422) -> ApiError:
    return ApiError(status, f"image: {message}", field=FIELD)


def has_magic(data: bytes, fmt: str) -> bool:
    """Whether ``data`` starts like a file of ``fmt``."""
    if fmt == "png":
        return data.startswith(b"\x89PNG\r\n\x1a\n")
    if fmt == "jpeg":
        return data.startswith(b"\xff\xd8\xff")
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def header_size(data: bytes, fmt: str) -> tuple[int, int]:
    """(width, height) from the image's header alone, refused (ApiError) when Pillow cannot read it as
    ``fmt`` or it declares more than MAX_INPUT_IMAGE_PIXELS."""
    with warnings.catch_warnings():
        # Pillow warns from 89 MP and refuses from twice that; the bound that counts is checked below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]]) as image:  # reads the header only
                width, height = image.size
        except Image.DecompressionBombError:
            width, height = -1, -1
        # A parser reading hostile bytes can fail in many ways; each one means the same thing here.
        except Exception:  # noqa: BLE001
            raise _refuse(f"the data is not a readable {fmt.upper()} image") from None
    if width < 0 or width * height > MAX_INPUT_IMAGE_PIXELS:
        declared = f"{width}x{height} pixels" if width >= 0 else "a size"
        raise _refuse(
            f"the image declares {declared}, more than the maximum of {MAX_INPUT_IMAGE_PIXELS:,} pixels "
            "(8192x8192); refused before decoding"
        )
    return width, height


def parse_data_url(url: str, max_bytes: int) -> InputImageFile:
    """Check a ``data:image/...;base64,`` URL; ApiError (422, or 413 above ``max_bytes``) naming ``image``."""
    match = _DATA_URL_RE.match(url)
    if match is None:
        if not url.startswith("data:"):
            raise _refuse("must be a data: URL (data:image/png;base64,...) or {\"job\": id, \"index\": n}")
        raise _refuse("the data: URL must be base64-encoded (data:image/png;base64,...)")
    media_type = match.group(1).lower()
    fmt = INPUT_IMAGE_TYPES.get(media_type)
    if fmt is None:
        raise _refuse(f"media type {media_type!r} is not one of {', '.join(INPUT_IMAGE_TYPES)}")
    encoded = url[match.end():].encode("ascii", errors="replace")
    # Checked before decoding: base64 holds 3 bytes in every 4 characters.
    if len(encoded) // 4 * 3 > max_bytes + 2:
        raise _refuse(f"the image is larger than the limit of {max_bytes} bytes (URAE_MAX_INPUT_IMAGE_BYTES)", 413)
    if not encoded or len(encoded) % 4 or not _BASE64_RE.match(encoded):
        raise _refuse("the data: URL's data is not valid base64 (no spaces or line breaks)")
    try:
        data = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise _refuse("the data: URL's data is not valid base64 (no spaces or line breaks)") from None
    if len(data) > max_bytes:
        raise _refuse(f"the image is larger than the limit of {max_bytes} bytes (URAE_MAX_INPUT_IMAGE_BYTES)", 413)
    if not has_magic(data, fmt):
        raise _refuse(f"the data is not a {fmt.upper()} image (its first bytes say otherwise)")
    width, height = header_size(data, fmt)
    return InputImageFile(data, fmt, width, height)
