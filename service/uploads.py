"""Checks on uploaded files that need no model: safetensors headers and dataset archives.

An archive is extracted only after every member passed: bounded count and total size (the sizes
actually read, not the ones the archive claims), plain relative names, regular files only, images
that are images, captions that are text. Extraction goes to a temporary directory under the storage
root that is renamed into place, so nothing is ever written outside the root and no half dataset is
ever visible.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

SAFETENSORS_DTYPES = {"F16", "BF16", "F32"}
MAX_HEADER_BYTES = 100 * 1024 * 1024
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
CAPTION_SUFFIXES = {".txt", ".json"}
MAX_CAPTION_BYTES = 1024 * 1024
_MEMBER_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._()+-]{0,199}$")
_CHUNK = 1024 * 1024


class UploadError(ValueError):
    """An uploaded file is refused; the message says why."""


# URAE's minor-component layout (the official 4K adapter): <block>.<i>.attn.processor.to_{q|k|v|out}_{a|b}.weight.
MINOR_COMPONENT_KEY_RE = re.compile(
    r"(?:transformer\.)?(?:single_)?transformer_blocks\.\d+\.attn\.processor\.to_(?:q|k|v|out)_[ab]\.weight"
)


@dataclass(frozen=True)
class SafetensorsSummary:
    tensors: int
    header_bytes: int
    metadata: dict[str, str]
    tensor_names: tuple[str, ...] = ()

    @property
    def is_minor_components(self) -> bool:
        """True for a URAE minor-component file (converted on top of the LoRA fused before its split)."""
        return any(MINOR_COMPONENT_KEY_RE.fullmatch(name) for name in self.tensor_names)


def check_safetensors(path: Path) -> SafetensorsSummary:
    """Validate the header of a safetensors file without torch: length, JSON, dtypes, offsets."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UploadError("not a safetensors file: shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        plausible = 0 < length <= MAX_HEADER_BYTES and 8 + length <= size
        # A real header length can start with these bytes too (128 mod 256): look only when it cannot be one.
        if not plausible and (head[:2] == b"PK" or head[:1] == b"\x80"):
            raise UploadError("not a safetensors file: this looks like a pickle/.bin checkpoint, which is never loaded")
        if not plausible:
            raise UploadError(f"not a safetensors file: header length {length} does not fit a {size}-byte file")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UploadError("not a safetensors file: the header is not JSON") from None
    if not isinstance(header, dict):
        raise UploadError("not a safetensors file: the header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not header:
        raise UploadError("the file holds no tensors")
    data_size = size - 8 - length
    for name, entry in header.items():
        if not isinstance(entry, dict) or {"dtype", "shape", "data_offsets"} - set(entry):
            raise UploadError(f"tensor {name!r}: the header entry lacks dtype, shape or data_offsets")
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise UploadError(f"tensor {name!r}: dtype {entry['dtype']} is not one of F16, BF16, F32")
        begin, end = entry["data_offsets"]
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
            raise UploadError(f"tensor {name!r}: data offsets point outside the file (truncated upload?)")
    return SafetensorsSummary(
        len(header), length, {str(k): str(v) for k, v in metadata.items()}, tuple(str(k) for k in header)
    )


def copy_bounded(src: IO[bytes], dest: BinaryIO, limit: int, what: str) -> int:
    """Copy at most ``limit`` bytes; UploadError when the source holds more."""
    total = 0
    while chunk := src.read(_CHUNK):
        total += len(chunk)
        if total > limit:
            raise UploadError(f"{what} is larger than the limit of {limit} bytes")
        dest.write(chunk)
    return total


@dataclass(frozen=True)
class ArchiveLimits:
    max_files: int
    max_total_bytes: int


@dataclass(frozen=True)
class _Member:
    name: str
    size: int
    open: object  # a zero-argument callable returning a binary file


def _check_member_name(name: str) -> str:
    clean = name.rstrip("/")
    parts = clean.split("/")
    if not clean or clean.startswith("/") or "\\" in clean or any(p in ("", ".", "..") for p in parts):
        raise UploadError(f"archive member {name!r}: not a plain relative path")
    if any(not _MEMBER_PART_RE.match(p) for p in parts):
        raise UploadError(f"archive member {name!r}: the name has characters that are not allowed")
    return clean


def _zip_members(archive: zipfile.ZipFile) -> list[_Member]:
    members = []
    for info in archive.infolist():
        if info.is_dir():
            continue
        mode = (info.external_attr >> 16) & 0o170000
        if mode and mode != 0o100000:
            raise UploadError(f"archive member {info.filename!r}: only regular files are allowed (no links)")
        members.append(_Member(info.filename, info.file_size, lambda info=info: archive.open(info)))
    return members


def _tar_members(archive: tarfile.TarFile) -> list[_Member]:
    members = []
    for info in archive:
        if info.isdir():
            continue
        if not info.isfile():
            raise UploadError(f"archive member {info.name!r}: only regular files are allowed (no links or devices)")
        members.append(_Member(info.name, info.size, lambda info=info: archive.extractfile(info)))
    return members


def _open_members(path: Path, stack: ExitStack) -> list[_Member]:
    if zipfile.is_zipfile(path):
        return _zip_members(stack.enter_context(zipfile.ZipFile(path)))
    try:
        archive = stack.enter_context(tarfile.open(path, "r:*"))
    except (tarfile.TarError, OSError):
        raise UploadError("the dataset is neither a zip nor a tar archive") from None
    return _tar_members(archive)


def _flat_names(names: list[str]) -> list[str]:
    """Training datasets are flat folders: one common top folder is dropped, deeper nesting refused."""
    parts = [n.split("/") for n in names]
    if parts and all(len(p) == 2 for p in parts) and len({p[0] for p in parts}) == 1:
        return [p[1] for p in parts]
    for name, p in zip(names, parts, strict=True):
        if len(p) != 1:
            raise UploadError(f"archive member {name!r}: put every file at the top level or in one folder")
    return names


def _check_content(name: str, head: bytes) -> None:
    suffix = Path(name).suffix.lower()
    if suffix in (".png",) and not head.startswith(b"\x89PNG\r\n\x1a\n"):
        raise UploadError(f"archive member {name!r}: not a PNG image")
    if suffix in (".jpg", ".jpeg") and not head.startswith(b"\xff\xd8\xff"):
        raise UploadError(f"archive member {name!r}: not a JPEG image")
    if suffix == ".webp" and not (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        raise UploadError(f"archive member {name!r}: not a WebP image")


def extract_dataset(archive_path: Path, dest: Path, limits: ArchiveLimits) -> int:
    """Check and extract a zip/tar of images and captions into ``dest`` (which must not exist yet).

    Returns the number of images. Nothing is left behind on failure.
    """
    if dest.exists():
        raise UploadError(f"dataset {dest.name!r} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
    try:
        images = _extract_into(archive_path, staging, limits)
        if images == 0:
            raise UploadError("the archive holds no images (.png, .jpg, .jpeg, .webp)")
        os.replace(staging, dest)
        return images
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise UploadError(f"the archive is damaged: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_into(archive_path: Path, staging: Path, limits: ArchiveLimits) -> int:
    images = 0
    total = 0
    with ExitStack() as stack:
        members = _open_members(archive_path, stack)
        if len(members) > limits.max_files:
            raise UploadError(f"the archive holds more than {limits.max_files} files")
        names = _flat_names([_check_member_name(m.name) for m in members])
        if len({n.lower() for n in names}) != len(names):
            raise UploadError("two archive members have the same name")
        for member, name in zip(members, names, strict=True):
            suffix = Path(name).suffix.lower()
            if suffix not in IMAGE_SUFFIXES | CAPTION_SUFFIXES:
                raise UploadError(f"archive member {name!r}: only images and caption files are allowed")
            if member.size > limits.max_total_bytes - total:
                raise UploadError(f"the archive expands beyond the limit of {limits.max_total_bytes} bytes")
            target = staging / name
            src = member.open()  # type: ignore[operator]
            with src, open(target, "wb") as out:
                # Count what is actually read: an archive can lie about its sizes.
                total += copy_bounded(src, out, limits.max_total_bytes - total, "the expanded archive")
            with open(target, "rb") as f:
                head = f.read(16)
            _check_content(name, head)
            if suffix in CAPTION_SUFFIXES:
                if target.stat().st_size > MAX_CAPTION_BYTES:
                    raise UploadError(f"archive member {name!r}: a caption file over {MAX_CAPTION_BYTES} bytes")
                try:
                    target.read_text(encoding="utf-8")
                except UnicodeDecodeError:
                    raise UploadError(f"archive member {name!r}: captions must be UTF-8 text") from None
            else:
                images += 1
    return images


@contextmanager
def spooled_upload(src: IO[bytes], directory: Path, limit: int, what: str, suffix: str = "") -> Iterator[Path]:
    """Copy an upload stream to a temporary file (bounded); the file is removed afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            copy_bounded(src, out, limit, what)
        yield path
    finally:
        path.unlink(missing_ok=True)
