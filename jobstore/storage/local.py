"""Where results, adapters and datasets live: a small interface over a local directory.

Keys are relative, slash-separated names (``jobs/<id>/0.png``). Every write goes to a temporary file
in the same directory and is renamed into place, so a reader never sees a half-written object. An
object store could implement the same five methods for workers on many hosts.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_KEY_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StorageKeyError(ValueError):
    """A storage key is not a plain relative name (``..``, absolute, odd characters)."""


class LocalStorage:
    """Objects as files under one root directory; nothing is ever written outside it."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The local file of a key, after checking that the key cannot leave the root."""
        parts = key.split("/")
        if not key or any(not _KEY_PART_RE.match(p) or p in (".", "..") for p in parts):
            raise StorageKeyError(f"invalid storage key {key!r}")
        path = self.root.joinpath(*parts)
        if self.root not in path.parents:
            raise StorageKeyError(f"invalid storage key {key!r}")
        return path

    def temp_path(self, key: str) -> Path:
        """A fresh temporary file next to ``key``'s final place, for writers that need a path."""
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=".tmp-", suffix=final.suffix)
        os.close(fd)
        return Path(name)

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` atomically."""
        tmp = self.temp_path(key)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(key))
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, key: str, src: Path) -> None:
        """Move a finished local file under ``key`` atomically (``src`` should come from temp_path)."""
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if Path(src).parent.resolve() == final.parent:
            os.replace(src, final)
            return
        tmp = self.temp_path(key)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when absent."""
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        """Remove an object, or every object under a prefix; absent keys are not an error."""
        path = self.path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def list(self, prefix: str) -> Iterator[str]:
        """Keys of the finished objects under a prefix, sorted (temporary files are not listed)."""
        base = self.path(prefix)
        if not base.is_dir():
            return iter(())
        keys = sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )
        return iter(keys)
