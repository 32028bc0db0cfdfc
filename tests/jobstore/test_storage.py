"""The storage contract, the same on every backend: a local folder and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobstore.storage import (
    LocalStorage,
    ObjectExists,
    ObjectNotFound,
    Storage,
    StorageKeyError,
    StorageUnavailable,
    open_storage,
)
from jobstore.storage.s3 import TREE_MANIFEST
from tests.conftest import make_settings


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    env = {"URAE_API_KEYS": "k", "URAE_STORAGE_DIR": str(tmp_path / "local"), "URAE_CACHE_DIR": str(tmp_path / "cache")}
    if request.param == "s3":
        env.update(request.getfixturevalue("s3_env"))
    yield open_storage(make_settings(env))


def test_the_backend_follows_the_storage_url(storage: Storage, request: pytest.FixtureRequest) -> None:
    assert type(storage).__name__ == ("LocalStorage" if "local" in request.node.name else "S3Storage")


def test_put_get_stat_list_delete(storage: Storage) -> None:
    before = time.time()
    storage.put("jobs/abc/0.png", b"one")
    storage.put("jobs/abc/1.png", b"two!")
    storage.put("jobs/abcd/0.png", b"other job")
    assert storage.get("jobs/abc/0.png") == b"one"
    assert b"".join(storage.iter_bytes("jobs/abc/1.png", chunk_size=1)) == b"two!"
    info = storage.stat("jobs/abc/1.png")
    assert info.size == 4 and before - 5 <= info.modified <= time.time() + 5
    # A prefix is a folder: jobs/abc does not cover jobs/abcd.
    assert list(storage.list("jobs/abc")) == ["jobs/abc/0.png", "jobs/abc/1.png"]
    assert [(i.key, i.size) for i in storage.list_objects("jobs")] == [
        ("jobs/abc/0.png", 3), ("jobs/abc/1.png", 4), ("jobs/abcd/0.png", 9)]
    storage.put("jobs/abc/0.png", b"replaced")
    assert storage.get("jobs/abc/0.png") == b"replaced"
    storage.delete("jobs/abc")
    assert list(storage.list("jobs")) == ["jobs/abcd/0.png"]
    assert not storage.exists("jobs/abc/0.png") and storage.exists("jobs/abcd/0.png")
    storage.delete("jobs/abcd/0.png")
    storage.delete("jobs/never-there")  # absent: not an error
    assert list(storage.list("jobs")) == []


def test_absent_objects_are_object_not_found(storage: Storage) -> None:
    for call in (storage.get, storage.stat, storage.iter_bytes, storage.local_file, storage.local_tree):
        with pytest.raises(ObjectNotFound):
            call("jobs/none/0.png")
    assert not storage.exists("jobs/none/0.png") and not storage.tree_exists("datasets/none")


def test_a_file_written_through_temp_path_is_hidden_until_put(storage: Storage) -> None:
    tmp = storage.temp_path("jobs/abc/2.png")
    tmp.write_bytes(b"three")
    assert list(storage.list("jobs")) == [] and not storage.exists("jobs/abc/2.png")
    storage.put_file("jobs/abc/2.png", tmp)
    tmp.unlink(missing_ok=True)
    assert storage.get("jobs/abc/2.png") == b"three"
    assert storage.stat("jobs/abc/2.png").size == 5


def test_a_large_file_is_stored_whole(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "big.safetensors"
    payload = bytes(range(256)) * (3 * 4096 + 17)  # 3 MiB and a bit
    src.write_bytes(payload)
    storage.put_file("adapters/big/v1.safetensors", src)
    assert storage.stat("adapters/big/v1.safetensors").size == len(payload)
    assert storage.local_file("adapters/big/v1.safetensors").read_bytes() == payload


def test_a_reader_never_sees_half_an_object(storage: Storage) -> None:
    old, new = b"a" * 2_000_000, b"b" * 2_000_000
    storage.put("jobs/r/0.png", old)
    seen: set[bytes] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            data = storage.get("jobs/r/0.png")
            seen.add(data[:1] * len(data) == data and len(data) == 2_000_000)  # type: ignore[arg-type]

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(5):
        storage.put("jobs/r/0.png", new)
        storage.put("jobs/r/0.png", old)
    stop.set()
    reader.join()
    assert seen == {True}


def count_downloads(storage: Storage) -> list[str]:
    """The paths the S3 client GETs from now on (boto3's own event hooks on the real client)."""
    from urllib.parse import unquote

    gets: list[str] = []
    if not isinstance(storage, LocalStorage):
        storage.client.meta.events.register(  # type: ignore[attr-defined]
            "before-call.s3.GetObject", lambda params, **_: gets.append(unquote(params["url_path"]))
        )
    return gets


def folders(paths: list[str]) -> list[str]:
    return [p.rsplit("/", 2)[-2] for p in paths]


def test_local_file_copies_are_cached_by_content(storage: Storage) -> None:
    storage.put("adapters/x/v1.safetensors", b"weights")
    storage.put("adapters/y/v1.safetensors", b"weights")
    downloads = count_downloads(storage)
    first = storage.local_file("adapters/x/v1.safetensors")
    assert first.read_bytes() == b"weights" and first.suffix == ".safetensors"
    copy = first.stat()
    assert storage.local_file("adapters/x/v1.safetensors") == first
    if not isinstance(storage, LocalStorage):
        # Same bytes under another name: one cached copy.
        assert storage.local_file("adapters/y/v1.safetensors") == first
        assert folders(downloads) == ["x"]  # one download for three calls
        assert (first.stat().st_ino, first.stat().st_size) == (copy.st_ino, copy.st_size)  # the same file, kept
    storage.put("adapters/x/v1.safetensors", b"new weights")
    assert storage.local_file("adapters/x/v1.safetensors").read_bytes() == b"new weights"
    if not isinstance(storage, LocalStorage):
        assert folders(downloads) == ["x", "x"]  # changed content: fetched again, once


def test_a_tree_appears_whole_and_once(storage: Storage, tmp_path: Path) -> None:
    folder = tmp_path / "pets"
    folder.mkdir()
    (folder / "img0.png").write_bytes(b"\x89PNG 0")
    (folder / "img0.txt").write_text("a cat")
    (folder / "img 1 (copy).png").write_bytes(b"\x89PNG 1")  # archive names may hold spaces
    assert not storage.tree_exists("datasets/pets")
    storage.put_tree("datasets/pets", folder)
    assert storage.tree_exists("datasets/pets")
    assert list(storage.list("datasets/pets")) == [
        "datasets/pets/img 1 (copy).png", "datasets/pets/img0.png", "datasets/pets/img0.txt"]
    downloads = count_downloads(storage)
    local = storage.local_tree("datasets/pets")
    assert sorted(p.name for p in local.iterdir()) == ["img 1 (copy).png", "img0.png", "img0.txt"]
    assert (local / "img0.txt").read_text() == "a cat"
    fetched = len(downloads)
    assert storage.local_tree("datasets/pets") == local
    if not isinstance(storage, LocalStorage):
        assert fetched == 4  # the manifest and the three files
        assert len(downloads) == fetched + 1 and downloads[-1].endswith(f"/datasets/pets/{TREE_MANIFEST}")  # cached
    again = tmp_path / "again"
    again.mkdir()
    (again / "x.png").write_bytes(b"x")
    with pytest.raises(ObjectExists):
        storage.put_tree("datasets/pets", again)
    storage.delete("datasets/pets")
    assert not storage.tree_exists("datasets/pets") and list(storage.list("datasets")) == []


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../b", "a//b", "", "a/./b", "caf\u00e9", "a/%2e%2e", ".hidden"])
def test_keys_that_could_leave_the_root_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(StorageKeyError):
        storage.put(key, b"x")
    with pytest.raises(StorageKeyError):
        storage.get(key)


def test_local_storage_writes_nothing_outside_its_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    for key in ("../x", "a/../../b", "/etc/passwd"):
        with pytest.raises(StorageKeyError):
            storage.put(key, b"x")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_presigned_download_url_fetches_the_object(s3_env: dict[str, str], tmp_path: Path) -> None:
    import httpx

    settings = make_settings({"URAE_API_KEYS": "k", "URAE_CACHE_DIR": str(tmp_path), **s3_env,
                              "URAE_S3_PRESIGNED_DOWNLOADS": "true", "URAE_S3_PRESIGNED_TTL_S": "60"})
    storage = open_storage(settings)
    storage.put("jobs/p/0.png", b"\x89PNG presigned")
    url = storage.download_url("jobs/p/0.png")
    assert url is not None and "Signature" in url
    response = httpx.get(str(url))
    assert response.status_code == 200 and response.content == b"\x89PNG presigned"
    assert response.headers["content-type"] == "image/png"
    assert httpx.get(str(url).replace("0.png", "1.png")).status_code in (403, 404)  # the signature is per object
    assert open_storage(make_settings({"URAE_API_KEYS": "k", "URAE_CACHE_DIR": str(tmp_path), **s3_env})
                        ).download_url("jobs/p/0.png") is None


def test_an_unreachable_store_is_storage_unavailable_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    settings = make_settings({"URAE_API_KEYS": "k", "URAE_CACHE_DIR": str(tmp_path), "URAE_STORAGE_URL": "s3://nobucket/p",
                              "URAE_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"})
    storage = open_storage(settings)
    started = time.monotonic()
    calls: list[Any] = [lambda: storage.put("a/b", b"x"), lambda: storage.get("a/b"), lambda: list(storage.list("a")),
                        lambda: storage.delete("a"), lambda: storage.tree_exists("datasets/d")]
    for call in calls:
        with pytest.raises(StorageUnavailable, match="object store is unavailable"):
            call()
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("url", ["http://example.com/x", "s3://", "s3://a/../b", "s3://bad_bucket!/x"])
def test_a_bad_storage_url_is_refused_by_the_settings(url: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="URAE_STORAGE_URL|bucket|invalid storage key"):
        make_settings({"URAE_API_KEYS": "k", "URAE_STORAGE_URL": url})


def test_storage_dir_stays_the_local_default(tmp_path: Path) -> None:
    storage = open_storage(make_settings({"URAE_API_KEYS": "k", "URAE_STORAGE_DIR": str(tmp_path / "d")}))
    assert isinstance(storage, LocalStorage) and storage.root == (tmp_path / "d").resolve()
    storage = open_storage(make_settings({"URAE_API_KEYS": "k", "URAE_STORAGE_URL": str(tmp_path / "u")}))
    assert isinstance(storage, LocalStorage) and storage.root == (tmp_path / "u").resolve()


def test_the_local_cache_keeps_to_its_bound_least_recently_used_first(s3_env: dict[str, str], tmp_path: Path) -> None:
    import os

    settings = make_settings({"URAE_API_KEYS": "k", "URAE_CACHE_DIR": str(tmp_path), **s3_env,
                              "URAE_CACHE_MAX_BYTES": "2500"})
    storage = open_storage(settings)
    for name in ("a", "b", "c", "d"):
        storage.put(f"adapters/{name}/v.safetensors", name.encode() * 1000)
    a, b = storage.local_file("adapters/a/v.safetensors"), storage.local_file("adapters/b/v.safetensors")
    hour_ago = time.time() - 3600
    os.utime(a, (hour_ago - 60, hour_ago - 60))
    os.utime(b, (hour_ago, hour_ago))
    c = storage.local_file("adapters/c/v.safetensors")  # 3000 bytes > 2500: the oldest goes
    assert not a.exists() and b.exists() and c.exists()
    d = storage.local_file("adapters/d/v.safetensors")
    assert not b.exists() and c.exists() and d.exists()
    assert storage.local_file("adapters/a/v.safetensors").read_bytes() == b"a" * 1000  # fetched again
    # 3000 bytes again, but copies used in the last minutes stay: a job may be reading them.
    assert c.exists() and d.exists()
