"""The images of a job go when its record expires; live jobs and fresh folders are never touched."""

from __future__ import annotations

import os
import time

import redis

from jobstore.contract import job_key
from jobstore.retention import sweep_expired_outputs
from jobstore.storage import LocalStorage

DAY = 24 * 3600.0


def _job_folder(storage: LocalStorage, job_id: str, age_s: float) -> None:
    storage.put(f"jobs/{job_id}/0.png", b"png bytes")
    then = time.time() - age_s
    for path in (storage.path(f"jobs/{job_id}/0.png"), storage.path(f"jobs/{job_id}")):
        os.utime(path, (then, then))


def test_only_old_folders_without_a_record_are_deleted(redis_url: str, tmp_path) -> None:
    conn = redis.Redis.from_url(redis_url)
    storage = LocalStorage(tmp_path / "storage")
    expired, kept_by_record, still_fresh = "a" * 32, "b" * 32, "c" * 32
    _job_folder(storage, expired, age_s=2 * DAY)
    _job_folder(storage, kept_by_record, age_s=2 * DAY)
    _job_folder(storage, still_fresh, age_s=60)
    conn.hset(job_key(kept_by_record), mapping={"status": "finished"})
    try:
        removed = sweep_expired_outputs(conn, storage, result_ttl_s=DAY)
    finally:
        conn.delete(job_key(kept_by_record))
    assert removed == [expired]
    assert not storage.path(f"jobs/{expired}").exists()
    assert storage.exists(f"jobs/{kept_by_record}/0.png") and storage.exists(f"jobs/{still_fresh}/0.png")
    assert sweep_expired_outputs(conn, LocalStorage(tmp_path / "empty"), result_ttl_s=DAY) == []
