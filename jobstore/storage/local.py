"""Objects as files under one local directory (one host, or a volume every process mounts).

Every write goes to a temporary file in the same directory and is renamed into place, so a reader
never sees a half-written object; a tree is built aside and renamed into place as a whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from jobstore.file_modes import apply_umask
from jobstore.storage.base import (
    HIDDEN_PREFIX,
    STREAM_CHUNK_BYTES,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    Storage,
    StorageKeyError,
    check_key,
)

_TEMP_PREFIX = ".tmp-"


class LocalStorage(Storage):
    """Objects as files under one root directory; nothing is ever written outside it."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The local file of a key, after checking that the key cannot leave the root."""
        path = self.root.joinpath(*check_key(key).split("/"))
        if self.root not in path.parents:
            raise StorageKeyError(f"invalid storage key {key!r}")
        return path

    def temp_path(self, key: str) -> Path:
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=_TEMP_PREFIX, suffix=final.suffix)
        os.close(fd)
        apply_umask(name)
        return Path(name)

    def staging_dir(self) -> Path:
        # Inside the root: staged files are renamed into place without a copy.
        staging = self.root / "uploads"
        staging.mkdir(parents=True, exist_ok=True)
        return staging

    def put(self, key: str, data: bytes) -> None:
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
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r}") from None

    def iter_bytes(self, key: str, chunk_size: int = STREAM_CHUNK_BYTES) -> Iterator[bytes]:
        try:
            f = open(self.path(key), "rb")  # noqa: SIM115 - closed by the generator
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r}") from None

        def chunks() -> Iterator[bytes]:
            with f:
                while chunk := f.read(chunk_size):
                    yield chunk

        return chunks()

    def stat(self, key: str) -> ObjectInfo:
        path = self.path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r}") from None
        if not path.is_file():
            raise ObjectNotFound(f"no object {key!r}")
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        path = self.path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self.path(prefix)
        if not base.is_dir():
            return iter(())
        infos = []
        for p in base.rglob("*"):
            rel = p.relative_to(self.root)
            if any(part.startswith(HIDDEN_PREFIX) for part in rel.parts) or not p.is_file():
                continue
            try:
                st = p.stat()
            except FileNotFoundError:  # deleted meanwhile
                continue
            infos.append(ObjectInfo(rel.as_posix(), st.st_size, st.st_mtime))
        return iter(sorted(infos, key=lambda i: i.key))

    def local_file(self, key: str) -> Path:
        path = self.path(key)
        if not path.is_file():
            raise ObjectNotFound(f"no object {key!r}")
        return path

    def put_tree(self, prefix: str, folder: Path) -> None:
        dest = self.path(prefix)
        if dest.exists():
            raise ObjectExists(f"{prefix!r} already exists")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=_TEMP_PREFIX))
        try:
            if Path(folder).resolve().parent.stat().st_dev == dest.parent.stat().st_dev:
                os.replace(folder, staging / "tree")
            else:
                shutil.copytree(folder, staging / "tree")
            # rename(2) refuses to replace a non-empty folder: two writers of one tree cannot mix.
            os.rename(staging / "tree", dest)
        except OSError as exc:
            if dest.exists():
                raise ObjectExists(f"{prefix!r} already exists") from exc
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def tree_exists(self, prefix: str) -> bool:
        return self.path(prefix).is_dir()

    def local_tree(self, prefix: str) -> Path:
        path = self.path(prefix)
        if not path.is_dir():
            raise ObjectNotFound(f"no tree {prefix!r}")
        return path
