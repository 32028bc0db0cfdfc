"""Checks on uploaded files that need no model: safetensors headers and dataset archives.

An archive is extracted only after every member passed: bounded count and total size (the sizes
actually read, not the ones the archive claims), plain relative names, regular files only, images
that are images, captions that are text. Extraction goes to a temporary directory under the storage
root that is renamed into place, so nothing is ever written outside the root and no half dataset is
ever visible.
"""

from __future__ import annotations

import errno
import json
import lzma
import os
import re
import shutil
import struct
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from PIL import Image

from jobstore.file_modes import apply_umask

# The dtypes an adapter is served in, with their sizes in bytes.
SAFETENSORS_DTYPES = {"F16": 2, "BF16": 2, "F32": 4}
# A rank-48 LoRA on every linear layer of FLUX.1's 57 blocks (988 tensors) has a 135 KB header; 8 MiB
# leaves room for training metadata and is refused before it is read.
MAX_HEADER_BYTES = 8 * 1024 * 1024
MAX_TENSORS = 10_000
MAX_TENSOR_DIMS = 8
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
CAPTION_SUFFIXES = {".txt", ".json"}
# Largest image a dataset may hold, by its declared size: a 100-megapixel photo (300 MB decoded). An
# image that claims more (a decompression bomb: a few KB of PNG declaring 100000x100000) is refused
# from its header, before a pixel is decoded.
MAX_IMAGE_PIXELS = 100_000_000
# The zip end-of-directory record: 22 bytes and a comment of up to 64 KiB.
_ZIP_EOCD_MAX = 22 + 65535
# Bytes a zip directory entry may take (46 fixed, a name of at most 200 characters, extra fields).
_ZIP_ENTRY_MAX = 1024
MAX_CAPTION_BYTES = 1024 * 1024
_MEMBER_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._()+-]{0,199}$")
_CHUNK = 1024 * 1024


# What zipfile, tarfile and the decompressors raise on damaged input, besides OSError (bz2, gzip):
# an encrypted member (RuntimeError), a compression method Python lacks (NotImplementedError), bad
# deflate or LZMA data, a truncated stream, broken headers and field values.
DAMAGED_ARCHIVE_ERRORS = (
    zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, RuntimeError, NotImplementedError,
    lzma.LZMAError, zlib.error, struct.error, ValueError, OverflowError,
)

# A write that failed for lack of space (disk, quota, file size limit) rather than bad input.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


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
    """Validate the header of a safetensors file without torch: length, JSON, dtypes, shapes, offsets."""
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
        if length > MAX_HEADER_BYTES:
            # Refused before a byte of it is read or parsed.
            raise UploadError(
                f"safetensors header length {length} is over the {MAX_HEADER_BYTES} bytes an adapter's header may have"
            )
        if not plausible:
            raise UploadError(f"not a safetensors file: header length {length} does not fit a {size}-byte file")
        raw = f.read(length)
    return parse_safetensors_header(raw, size - 8 - length)


def _describe(name: object) -> str:
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_safetensors_header(raw: bytes, data_size: int) -> SafetensorsSummary:
    """Check a safetensors header (the JSON after the length) against a data section of ``data_size``
    bytes, as the safetensors library would before loading: any problem is an :class:`UploadError`
    naming it, never another exception."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UploadError("not a safetensors file: the header is not UTF-8 text") from None
    try:
        header = json.loads(text)
    except RecursionError:
        raise UploadError("the safetensors header is nested too deeply to be a tensor table") from None
    except ValueError:  # JSONDecodeError, and integers longer than Python converts
        raise UploadError("not a safetensors file: the header is not JSON") from None
    if not isinstance(header, dict):
        raise UploadError("not a safetensors file: the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UploadError("the safetensors __metadata__ must be an object whose values are strings")
    if not header:
        raise UploadError("the file holds no tensors")
    if len(header) > MAX_TENSORS:
        raise UploadError(f"the file holds {len(header)} tensors; an adapter has at most {MAX_TENSORS}")
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        where = f"tensor {_describe(name)}"
        if not isinstance(entry, dict) or {"dtype", "shape", "data_offsets"} - set(entry):
            raise UploadError(f"{where}: the header entry lacks dtype, shape or data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise UploadError(f"{where}: dtype {_describe(dtype)} is not one of F16, BF16, F32")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_TENSOR_DIMS
            or not all(_is_int(d) and 0 <= d < 2**40 for d in shape)
        ):
            raise UploadError(f"{where}: shape must be a list of at most {MAX_TENSOR_DIMS} non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise UploadError(f"{where}: data_offsets must be a list of two integers")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise UploadError(f"{where}: data offsets point outside the file (truncated upload?)")
        elements = 1
        for d in shape:
            elements *= d
        if end - begin != elements * SAFETENSORS_DTYPES[dtype]:
            raise UploadError(f"{where}: data offsets hold {end - begin} bytes, its shape and dtype need "
                              f"{elements * SAFETENSORS_DTYPES[dtype]}")
        ranges.append((begin, end, where))
    # The tensors tile the data section exactly, as the safetensors library requires.
    position = 0
    for begin, end, where in sorted(ranges):
        if begin != position:
            problem = "overlaps another tensor" if begin < position else "leaves a gap before it"
            raise UploadError(f"{where}: its data {problem}")
        position = end
    if position != data_size:
        raise UploadError(f"the tensors hold {position} bytes but the file has {data_size} bytes of data")
    return SafetensorsSummary(
        len(header), len(raw), {str(k): v for k, v in metadata.items()}, tuple(str(k) for k in header)
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


# The training resolution of a fine-tune whose recipe sets none: the library's default and the shipped
# recipes' own (tests check both against urae).
DEFAULT_TRAINING_RESOLUTION = 2048
SHIPPED_RECIPE_RESOLUTIONS = {"urae-2k": 2048, "urae-4k": 4096}


def min_image_long_side(recipe: str | None, resolution: int | None) -> int:
    """The longer side every training image must reach: half the training resolution, the rule the
    training code applies (a smaller image would be upscaled more than twofold)."""
    if resolution is None:
        resolution = SHIPPED_RECIPE_RESOLUTIONS.get(recipe or "", DEFAULT_TRAINING_RESOLUTION)
    return resolution // 2


@dataclass(frozen=True)
class ArchiveLimits:
    max_files: int
    max_total_bytes: int
    # The longer side every image must reach (half the training resolution); 0: not checked here.
    min_image_long_side: int = 0


@dataclass(frozen=True)
class _Member:
    name: str
    size: int
    open: object  # a zero-argument callable returning a binary file


def _check_member_name(name: str) -> str:
    clean = name.rstrip("/")
    parts = clean.split("/")
    if not clean or clean.startswith("/") or "\\" in clean or any(p in ("", ".", "..") for p in parts):
        raise UploadError(f"archive member {_describe(name)}: not a plain relative path")
    if any(not _MEMBER_PART_RE.match(p) for p in parts):
        raise UploadError(f"archive member {_describe(name)}: the name has characters that are not allowed")
    return clean


def _too_many(limits: ArchiveLimits) -> UploadError:
    return UploadError(f"the archive holds more than {limits.max_files} files")


def _zip_entry_count(path: Path, limits: ArchiveLimits) -> None:
    """Count the entries of a zip's central directory before zipfile reads all of it into memory."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        tail_start = max(0, size - _ZIP_EOCD_MAX)
        f.seek(tail_start)
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            raise UploadError("the archive is damaged: a zip without its end-of-directory record")
        entries, cd_size, cd_offset = struct.unpack("<HII", tail[at + 10 : at + 20])
        if 0xFFFF in (entries,) or 0xFFFFFFFF in (cd_size, cd_offset):
            # Zip64: the real numbers are in the zip64 record that the locator before this one points at.
            locator = tail[at - 20 : at] if at >= 20 else b""
            if len(locator) < 20 or locator[:4] != b"PK\x06\x07":
                raise UploadError("the archive is damaged: a zip64 archive without its locator")
            (record_at,) = struct.unpack("<Q", locator[8:16])
            f.seek(min(record_at, size))
            record = f.read(56)
            if len(record) < 56 or record[:4] != b"PK\x06\x06":
                raise UploadError("the archive is damaged: a zip64 archive without its directory record")
            entries, cd_size, cd_offset = struct.unpack("<QQQ", record[32:56])
        # Directory entries count too; one top folder is allowed.
        if entries > limits.max_files + 1:
            raise _too_many(limits)
        if cd_size > (limits.max_files + 1) * _ZIP_ENTRY_MAX or cd_offset + cd_size > size:
            raise UploadError("the archive is damaged: its zip directory does not fit the file")
        # The count above is what the archive claims: count the records themselves.
        f.seek(cd_offset)
        directory = f.read(cd_size)
    position, seen, files = 0, 0, 0
    while position + 46 <= len(directory) and directory[position : position + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack("<HHH", directory[position + 28 : position + 34])
        seen += 1
        files += not directory[position + 46 : position + 46 + name_len].endswith(b"/")
        if seen > limits.max_files + 1 or files > limits.max_files:
            raise _too_many(limits)
        position += 46 + name_len + extra_len + comment_len


def _zip_members(archive: zipfile.ZipFile) -> Iterator[_Member]:
    for info in archive.infolist():
        if info.is_dir():
            continue
        mode = (info.external_attr >> 16) & 0o170000
        if mode and mode != 0o100000:
            raise UploadError(f"archive member {_describe(info.filename)}: only regular files are allowed (no links)")
        yield _Member(info.filename, info.file_size, lambda info=info: archive.open(info))


def _tar_members(archive: tarfile.TarFile, limits: ArchiveLimits) -> Iterator[_Member]:
    # One header at a time, as the (possibly compressed) stream is read: the count is checked before
    # the next header is, so a million empty members cost max_files + 1 headers, not a million.
    entries, files = 0, 0
    while (info := archive.next()) is not None:
        entries += 1
        files += not info.isdir()
        if entries > limits.max_files + 1 or files > limits.max_files:
            raise _too_many(limits)
        if info.isdir():
            continue
        if not info.isfile():
            raise UploadError(
                f"archive member {_describe(info.name)}: only regular files are allowed (no links or devices)"
            )
        yield _Member(info.name, info.size, lambda info=info: archive.extractfile(info))
        # tarfile keeps every header it has read: drop them, each member is dealt with once.
        archive.members.clear()


def _open_members(path: Path, stack: ExitStack, limits: ArchiveLimits) -> Iterator[_Member]:
    if zipfile.is_zipfile(path):
        _zip_entry_count(path, limits)
        return _zip_members(stack.enter_context(zipfile.ZipFile(path)))
    try:
        counting = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError):
        raise UploadError("the dataset is neither a zip nor a tar archive") from None
    # First the headers alone, counted as they are read; only an archive within the count is then read
    # again and extracted. A stream that breaks later is a damaged archive (see extract_dataset).
    with counting:
        for _ in _tar_members(counting, limits):
            pass
    return _tar_members(stack.enter_context(tarfile.open(path, "r:*")), limits)


def _check_content(name: str, head: bytes) -> None:
    suffix = Path(name).suffix.lower()
    if suffix in (".png",) and not head.startswith(b"\x89PNG\r\n\x1a\n"):
        raise UploadError(f"archive member {name!r}: not a PNG image")
    if suffix in (".jpg", ".jpeg") and not head.startswith(b"\xff\xd8\xff"):
        raise UploadError(f"archive member {name!r}: not a JPEG image")
    if suffix == ".webp" and not (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        raise UploadError(f"archive member {name!r}: not a WebP image")


def image_size(path: Path, name: str) -> tuple[int, int]:
    """An image's (width, height) from its header alone; a declared size over MAX_IMAGE_PIXELS (a
    decompression bomb) is refused without decoding a pixel."""
    with warnings.catch_warnings():
        # Pillow warns from 89 MP and refuses from twice that; the bound that counts is checked below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
        except Image.DecompressionBombError:
            raise UploadError(
                f"archive member {name!r}: declares more than {MAX_IMAGE_PIXELS} pixels; refused before decoding"
            ) from None
        # A decoder reading hostile bytes can fail in many ways; each one means the same thing here.
        except Exception:  # noqa: BLE001
            raise UploadError(f"archive member {name!r}: not a readable image") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise UploadError(
            f"archive member {name!r}: declares {width}x{height} pixels, more than {MAX_IMAGE_PIXELS}; "
            "refused before decoding"
        )
    return width, height


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
    except UploadError:
        raise
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise  # the server's disk is full: not the archive's fault (the API answers 507)
        raise UploadError(f"the archive is damaged: {exc.strerror or exc or type(exc).__name__}") from None
    except DAMAGED_ARCHIVE_ERRORS as exc:
        raise UploadError(f"the archive is damaged: {str(exc) or type(exc).__name__}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_into(archive_path: Path, staging: Path, limits: ArchiveLimits) -> int:
    images = 0
    total = 0
    seen: set[str] = set()
    top_files: list[str] = []
    folders: set[str] = set()
    with ExitStack() as stack:
        # Each member is checked and written as it is read: counts and sizes never wait for the end.
        for count, member in enumerate(_open_members(archive_path, stack, limits), start=1):
            if count > limits.max_files:
                raise _too_many(limits)
            name = _check_member_name(member.name)
            parts = name.split("/")
            # Training datasets are flat folders: one common top folder is dropped, deeper nesting refused.
            if len(parts) > 2 or (len(parts) == 2 and top_files) or (len(parts) == 1 and folders):
                raise UploadError(f"archive member {name!r}: put every file at the top level or in one folder")
            if len(parts) == 2:
                folders.add(parts[0])
                if len(folders) > 1:
                    raise UploadError(f"archive member {name!r}: put every file at the top level or in one folder")
            else:
                top_files.append(name)
            if name.lower() in seen:
                raise UploadError(f"archive member {name!r}: two archive members have the same name")
            seen.add(name.lower())
            suffix = Path(name).suffix.lower()
            if suffix not in IMAGE_SUFFIXES | CAPTION_SUFFIXES:
                raise UploadError(f"archive member {name!r}: only images and caption files are allowed")
            if member.size > limits.max_total_bytes - total:
                raise UploadError(f"the archive expands beyond the limit of {limits.max_total_bytes} bytes")
            target = staging / name
            target.parent.mkdir(exist_ok=True)
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
                width, height = image_size(target, name)
                if max(width, height) < limits.min_image_long_side:
                    raise UploadError(
                        f"archive member {name!r}: is {width}x{height}; the longer side of every image must be at "
                        f"least {limits.min_image_long_side} px (half the training resolution)"
                    )
                images += 1
    for folder in folders:
        for entry in (staging / folder).iterdir():
            os.replace(entry, staging / entry.name)
        (staging / folder).rmdir()
    return images


@contextmanager
def spooled_upload(src: IO[bytes], directory: Path, limit: int, what: str, suffix: str = "") -> Iterator[Path]:
    """Copy an upload stream to a temporary file (bounded); the file is removed afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    path = Path(name)
    apply_umask(path)  # it may be renamed into storage as it is
    try:
        with os.fdopen(fd, "wb") as out:
            copy_bounded(src, out, limit, what)
        yield path
    finally:
        path.unlink(missing_ok=True)
