"""Objects in an S3-compatible store (AWS S3, MinIO, SeaweedFS, R2) through boto3.

PutObject and the completion of a multipart upload are atomic: an object appears whole or not at
all. Every object carries the SHA-256 of its bytes (``x-amz-meta-sha256``), so a worker's local
copies are cached by content and checked after download. A tree (a dataset) is its files plus a
manifest written last (``<prefix>/.tree.json``): until the manifest exists the tree is not there.
Credentials come from boto3's usual sources (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a
profile, an instance role); the region from ``AWS_REGION``.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from jobstore.file_modes import apply_umask
from jobstore.storage.base import (
    HIDDEN_PREFIX,
    STREAM_CHUNK_BYTES,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    Storage,
    StorageKeyError,
    StorageUnavailable,
    check_key,
    parse_s3_url,
)

TREE_MANIFEST = ".tree.json"
# A cached copy used this recently is never pruned (a job may still be reading it).
_CACHE_IN_USE_S = 600.0
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_HASH_CHUNK = 1024 * 1024
# Multipart above 64 MiB (adapters can be GBs); the completed upload is still one atomic object.
_TRANSFER = TransferConfig(multipart_threshold=64 * 1024**2, multipart_chunksize=64 * 1024**2)


def _client_config(endpoint_url: str | None, connect_timeout_s: float) -> Config:
    return Config(
        connect_timeout=connect_timeout_s,
        read_timeout=60,
        # A store that is down fails the call within seconds instead of retrying for a minute.
        retries={"max_attempts": 3, "mode": "standard"},
        # Self-hosted stores (MinIO, SeaweedFS) are addressed by path; AWS picks its own style.
        s3={"addressing_style": "path" if endpoint_url else "auto"},
    )


@lru_cache(maxsize=4)
def _session(region: str) -> boto3.session.Session:
    # One per process and region: a new session loads botocore's service models again (~0.2 s).
    return boto3.session.Session(region_name=region)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _tree_member(name: str) -> str:
    # Members of a tree were named by a checked archive; refuse anything that could escape a folder.
    parts = name.split("/")
    if not name or "\\" in name or any(p in ("", ".", "..") or p.startswith(HIDDEN_PREFIX) for p in parts):
        raise StorageKeyError(f"invalid tree member {name!r}")
    return name


class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix``; local copies in ``cache_dir`` keyed by content hash."""

    def __init__(
        self,
        url: str,
        cache_dir: Path | str,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        presigned_ttl_s: int | None = None,
        connect_timeout_s: float = 3.0,
        cache_max_bytes: int | None = None,
    ):
        self.bucket, self.prefix = parse_s3_url(url)
        self.cache_dir = Path(cache_dir).resolve()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        session = _session(region)
        # Read here, not cached with the session; unset, boto3's own chain applies (profile, role).
        keys = {"aws_access_key_id": os.environ.get("AWS_ACCESS_KEY_ID"),
                "aws_secret_access_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
                "aws_session_token": os.environ.get("AWS_SESSION_TOKEN")}
        self.client: Any = session.client(
            "s3", endpoint_url=endpoint_url, config=_client_config(endpoint_url, connect_timeout_s), **keys
        )
        # A presigned URL is signed for the host the client will use: the public one when it differs.
        public = public_endpoint_url or endpoint_url
        self._presigner: Any = (
            session.client("s3", endpoint_url=public, config=_client_config(public, connect_timeout_s), **keys)
            if public != endpoint_url else self.client
        )
        self.presigned_ttl_s = presigned_ttl_s
        self.cache_max_bytes = cache_max_bytes
        self._cached: dict[str, Path] = {}

    # -- keys and errors ----------------------------------------------------------------------------
    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate boto3's errors: absent objects and an unreachable or failing store."""
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _NOT_FOUND_CODES:
                raise ObjectNotFound(f"no object {what!r}") from None
            raise StorageUnavailable(f"the object store refused the request ({code or 'error'})") from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise StorageUnavailable(f"the object store is unavailable ({type(exc).__name__})") from exc

    # -- objects ------------------------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> None:
        full = self._full(key)
        with self._errors(key):
            self.client.put_object(
                Bucket=self.bucket, Key=full, Body=data, ContentType=self._content_type(key),
                Metadata={"sha256": hashlib.sha256(data).hexdigest()},
            )

    def put_file(self, key: str, src: Path) -> None:
        full = self._full(key)
        extra = {"ContentType": self._content_type(key), "Metadata": {"sha256": _sha256_file(Path(src))}}
        with self._errors(key):
            self.client.upload_file(str(src), self.bucket, full, ExtraArgs=extra, Config=_TRANSFER)

    def get(self, key: str) -> bytes:
        full = self._full(key)
        with self._errors(key):
            return bytes(self.client.get_object(Bucket=self.bucket, Key=full)["Body"].read())

    def iter_bytes(self, key: str, chunk_size: int = STREAM_CHUNK_BYTES) -> Iterator[bytes]:
        full = self._full(key)
        with self._errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=full)["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                with self._errors(key):
                    yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

        return chunks()

    def _head(self, key: str) -> dict[str, Any]:
        full = self._full(key)
        with self._errors(key):
            return dict(self.client.head_object(Bucket=self.bucket, Key=full))

    def stat(self, key: str) -> ObjectInfo:
        head = self._head(key)
        return ObjectInfo(key, int(head["ContentLength"]), head["LastModified"].timestamp())

    def delete(self, key: str) -> None:
        full = self._full(key)
        with self._errors(key):
            keys = [o["Key"] for o in self._walk(full + "/")]
            # A tree's manifest goes first: a half-deleted tree is never taken for a whole one.
            keys.sort(key=lambda k: (not k.endswith("/" + TREE_MANIFEST), k))
            for start in range(0, len(keys), 1000):
                batch = [{"Key": k} for k in keys[start:start + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            self.client.delete_object(Bucket=self.bucket, Key=full)

    def _walk(self, full_prefix: str) -> Iterator[dict[str, Any]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full_prefix)
        for page in pages:
            yield from page.get("Contents", [])

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        full = self._full(prefix)
        with self._errors(prefix):
            infos = [
                ObjectInfo(self._relative(o["Key"]), int(o["Size"]), o["LastModified"].timestamp())
                for o in self._walk(full + "/")
            ]
        visible = [i for i in infos if not any(p.startswith(HIDDEN_PREFIX) for p in i.key.split("/"))]
        return iter(sorted(visible, key=lambda i: i.key))

    # -- local files --------------------------------------------------------------------------------
    def staging_dir(self) -> Path:
        staging = self.cache_dir / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        return staging

    def temp_path(self, key: str) -> Path:
        suffix = Path(check_key(key)).suffix
        fd, name = tempfile.mkstemp(dir=self.staging_dir(), prefix=".tmp-", suffix=suffix)
        os.close(fd)
        apply_umask(name)
        return Path(name)

    def local_file(self, key: str) -> Path:
        head = self._head(key)
        sha256 = (head.get("Metadata") or {}).get("sha256")
        content_id = f"sha256-{sha256}" if sha256 else "etag-" + str(head.get("ETag", "")).strip('"').replace("/", "_")
        objects = self.cache_dir / "objects"
        objects.mkdir(parents=True, exist_ok=True)
        cached = objects / f"{content_id}{Path(key).suffix}"
        if cached.is_file():
            os.utime(cached)  # recently used: the last to be pruned
        else:
            self._download(key, cached, sha256)
            self._prune(keep=cached)
        self._cached[key] = cached
        return cached

    def _download(self, key: str, dest: Path, sha256: str | None) -> None:
        """Download to a temporary file next to ``dest``, check the hash, rename into place."""
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=dest.suffix)
        os.close(fd)
        apply_umask(name)
        tmp = Path(name)
        try:
            with self._errors(key):
                self.client.download_file(self.bucket, self._full(key), str(tmp), Config=_TRANSFER)
            if sha256 and _sha256_file(tmp) != sha256:
                raise StorageUnavailable(f"object {key!r} changed or was damaged in transfer; retry")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def evict(self, key: str) -> None:
        cached = self._cached.pop(key, None)
        if cached is not None:
            cached.unlink(missing_ok=True)

    # -- trees --------------------------------------------------------------------------------------
    def put_tree(self, prefix: str, folder: Path) -> None:
        if self.tree_exists(prefix):
            raise ObjectExists(f"{prefix!r} already exists")
        self.delete(prefix)  # the leftovers of an earlier attempt that did not finish
        folder = Path(folder)
        files: dict[str, dict[str, Any]] = {}
        try:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                name = _tree_member(path.relative_to(folder).as_posix())
                sha256 = _sha256_file(path)
                with self._errors(prefix):
                    self.client.upload_file(
                        str(path), self.bucket, f"{self._full(prefix)}/{name}", Config=_TRANSFER,
                        ExtraArgs={"ContentType": self._content_type(name), "Metadata": {"sha256": sha256}},
                    )
                files[name] = {"sha256": sha256, "size": path.stat().st_size}
            manifest = json.dumps({"files": files}, sort_keys=True).encode()
            with self._errors(prefix):
                self.client.put_object(Bucket=self.bucket, Key=f"{self._full(prefix)}/{TREE_MANIFEST}",
                                       Body=manifest, ContentType="application/json")
        except BaseException:
            try:
                self.delete(prefix)
            except StorageUnavailable:
                pass  # invisible without its manifest; the next put_tree clears it
            raise

    def tree_exists(self, prefix: str) -> bool:
        with self._errors(prefix):
            try:
                self.client.head_object(Bucket=self.bucket, Key=f"{self._full(prefix)}/{TREE_MANIFEST}")
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code", "")) in _NOT_FOUND_CODES:
                    return False
                raise
        return True

    def local_tree(self, prefix: str) -> Path:
        full = self._full(prefix)
        try:
            with self._errors(prefix):
                manifest_bytes = self.client.get_object(Bucket=self.bucket, Key=f"{full}/{TREE_MANIFEST}")["Body"].read()
        except ObjectNotFound:
            raise ObjectNotFound(f"no tree {prefix!r}") from None
        trees = self.cache_dir / "trees"
        trees.mkdir(parents=True, exist_ok=True)
        cached = trees / hashlib.sha256(manifest_bytes).hexdigest()
        if cached.is_dir():
            os.utime(cached)
            return cached
        staging = Path(tempfile.mkdtemp(dir=trees, prefix=".tmp-"))
        try:
            for name, entry in json.loads(manifest_bytes)["files"].items():
                dest = staging / _tree_member(name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with self._errors(f"{prefix}/{name}"):
                    self.client.download_file(self.bucket, f"{full}/{name}", str(dest), Config=_TRANSFER)
                if _sha256_file(dest) != entry["sha256"]:
                    raise StorageUnavailable(f"{prefix}/{name} changed or was damaged in transfer; retry")
            try:
                os.rename(staging, cached)
            except OSError:
                if not cached.is_dir():  # another process of this host cached it first otherwise
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._prune(keep=cached)
        return cached

    def _prune(self, keep: Path) -> None:
        """Remove cached copies, least recently used first, until the cache fits its bound. Entries
        used in the last minutes stay whatever the size: a job may be reading them."""
        if self.cache_max_bytes is None:
            return
        entries = []
        for kind in ("objects", "trees"):
            for entry in (self.cache_dir / kind).glob("[!.]*"):
                try:
                    files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
                    entries.append((entry.stat().st_mtime, sum(p.stat().st_size for p in files), entry))
                except FileNotFoundError:  # pruned by another process meanwhile
                    continue
        total = sum(size for _, size, _ in entries)
        recent = time.time() - _CACHE_IN_USE_S
        for used, size, entry in sorted(entries, key=lambda e: e[0]):
            if total <= self.cache_max_bytes:
                break
            if entry == keep or used > recent:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            total -= size

    # -- downloads ----------------------------------------------------------------------------------
    def download_url(self, key: str) -> str | None:
        if not self.presigned_ttl_s:
            return None
        url = self._presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._full(key)}, ExpiresIn=self.presigned_ttl_s
        )
        return str(url)

    @staticmethod
    def _content_type(key: str) -> str:
        return mimetypes.guess_type(key)[0] or "application/octet-stream"
