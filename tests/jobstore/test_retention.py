"""The images of a job go when its record expires; live jobs and fresh images are never touched.
The same sweep on both storage backends (a local folder, a real S3 server)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from jobstore.contract import job_key
from jobstore.retention import sweep_expired_outputs
from jobstore.storage import Storage, open_storage
from tests.conftest import make_settings


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    env = {"URAE_API_KEYS": "k", "URAE_STORAGE_DIR": str(tmp_path / "local"), "URAE_CACHE_DIR": str(tmp_path / "cache")}
    if request.param == "s3":
        env.update(request.getfixturevalue("s3_env"))
    yield open_storage(make_settings(env))


def test_only_old_images_without_a_record_are_deleted(redis_url: str, storage: Storage) -> None:
    conn = redis.Redis.from_url(redis_url)
    expired, kept_by_record, still_fresh = "a" * 32, "b" * 32, "c" * 32
    storage.put(f"jobs/{expired}/0.png", b"png bytes")
    storage.put(f"jobs/{expired}/1.png", b"png bytes")
    storage.put(f"jobs/{kept_by_record}/0.png", b"png bytes")
    time.sleep(2.5)  # past the TTL below, with the 1 s resolution of S3's last-modified times
    storage.put(f"jobs/{still_fresh}/0.png", b"png bytes")
    conn.hset(job_key(kept_by_record), mapping={"status": "finished"})
    try:
        removed = sweep_expired_outputs(conn, storage, result_ttl_s=2)
    finally:
        conn.delete(job_key(kept_by_record))
    assert removed == [expired]
    assert list(storage.list(f"jobs/{expired}")) == []
    assert storage.exists(f"jobs/{kept_by_record}/0.png") and storage.exists(f"jobs/{still_fresh}/0.png")


def test_an_empty_storage_sweeps_nothing(redis_url: str, storage: Storage) -> None:
    assert sweep_expired_outputs(redis.Redis.from_url(redis_url), storage, result_ttl_s=60) == []
