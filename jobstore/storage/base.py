"""The storage interface every backend implements, and its errors.

Keys are relative, slash-separated names (``jobs/<id>/0.png``) checked the same way on every backend.
A writer either sees its whole object stored or nothing: no reader ever sees half an object. A
"tree" is a folder of objects that appears as a whole (a dataset): it counts as present only once
every file of it is stored.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_KEY_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Objects being written, and a backend's own bookkeeping, start with a dot: listings never show them.
HIDDEN_PREFIX = "."
STREAM_CHUNK_BYTES = 1024 * 1024


class StorageKeyError(ValueError):
    """A storage key is not a plain relative name (``..``, absolute, odd characters)."""


class ObjectNotFound(FileNotFoundError):
    """No object is stored under the key."""


class ObjectExists(FileExistsError):
    """A tree is already stored under the prefix (trees are written once)."""


class StorageUnavailable(OSError):
    """The storage backend cannot be reached or refuses service; retrying later may succeed."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    # Seconds since the epoch of the object's last write.
    modified: float


def check_key(key: str) -> str:
    """``key`` itself, after checking it is a plain relative name; StorageKeyError otherwise."""
    parts = key.split("/")
    if not key or any(not _KEY_PART_RE.match(p) or p in (".", "..") for p in parts):
        raise StorageKeyError(f"invalid storage key {key!r}")
    return key


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (bucket, "some/prefix"); ValueError when it is not one."""
    if not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not an s3:// URL")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    if not bucket or not all(c.isalnum() or c in ".-" for c in bucket) or not 3 <= len(bucket) <= 63:
        raise ValueError(f"{url!r}: the bucket name must be 3-63 letters, digits, dots or dashes")
    if prefix:
        check_key(prefix)
    return bucket, prefix


class Storage(ABC):
    """Where results, adapters and datasets live. The API and workers use only these methods."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically (replacing any previous object)."""

    @abstractmethod
    def put_file(self, key: str, src: Path) -> None:
        """Store a finished local file under ``key`` atomically. ``src`` may be moved away (when it
        comes from temp_path); the caller removes it if it is still there."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; ObjectNotFound when absent."""

    @abstractmethod
    def iter_bytes(self, key: str, chunk_size: int = STREAM_CHUNK_BYTES) -> Iterator[bytes]:
        """The object's bytes in chunks, for streaming a download; ObjectNotFound (raised by this
        call, before any chunk) when absent."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and last write of an object; ObjectNotFound when absent."""

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object, or every object under the prefix ``key/``; absent keys are not an error."""

    @abstractmethod
    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every finished object under the prefix ``prefix/``, sorted by key, with size and last write."""

    def list(self, prefix: str) -> Iterator[str]:
        """Keys of the finished objects under a prefix, sorted."""
        return (info.key for info in self.list_objects(prefix))

    @abstractmethod
    def temp_path(self, key: str) -> Path:
        """A fresh local file for a writer that needs a path; hand it to put_file(key, ...)."""

    @abstractmethod
    def staging_dir(self) -> Path:
        """A local folder for spooling uploads and building trees before they are stored."""

    @abstractmethod
    def local_file(self, key: str) -> Path:
        """A local, readable copy of an object (the file itself, or a copy in a cache keyed by its
        content); ObjectNotFound when absent. Never write to it."""

    @abstractmethod
    def put_tree(self, prefix: str, folder: Path) -> None:
        """Store every file of a flat local folder under ``prefix/``, visible only once all are stored.
        ``folder`` may be moved away. ObjectExists when a tree is already stored there."""

    @abstractmethod
    def tree_exists(self, prefix: str) -> bool:
        """Whether a complete tree is stored under ``prefix/``."""

    @abstractmethod
    def local_tree(self, prefix: str) -> Path:
        """A local, readable folder holding the tree (the folder itself, or a cached copy);
        ObjectNotFound when no complete tree is stored there. Never write to it."""

    def download_url(self, key: str) -> str | None:
        """A short-lived URL a client can fetch the object from directly, or None to stream it."""
        return None

    def evict(self, key: str) -> None:
        """Drop a cached local copy of an object that will not be read again (no-op without a cache)."""
        return None
