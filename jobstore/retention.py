"""Output retention: a finished job's images go when its record does.

Job records expire in Redis ``URAE_RESULT_TTL_S`` after the job ends; without a sweep their images
would stay on disk for ever. The API's maintenance thread deletes every ``jobs/<id>/`` folder whose
record is gone and which nothing has written to for longer than the TTL (so a job that is still
writing, or whose record is momentarily unreadable, is never touched).
"""

from __future__ import annotations

import time
from pathlib import Path

import redis

from jobstore.contract import job_key
from jobstore.storage import LocalStorage


def sweep_expired_outputs(conn: redis.Redis, storage: LocalStorage, result_ttl_s: float) -> list[str]:
    """Delete the image folders of jobs whose records have expired; returns their job ids."""
    jobs_dir: Path = storage.root / "jobs"
    if not jobs_dir.is_dir():
        return []
    cutoff = time.time() - result_ttl_s
    stale = [entry for entry in jobs_dir.iterdir() if entry.is_dir() and _last_write(entry) < cutoff]
    if not stale:
        return []
    pipe = conn.pipeline(transaction=False)
    for entry in stale:
        pipe.exists(job_key(entry.name))
    removed = []
    for entry, exists in zip(stale, pipe.execute(), strict=True):
        if not exists:
            storage.delete(f"jobs/{entry.name}")
            removed.append(entry.name)
    return removed


def _last_write(folder: Path) -> float:
    return max([folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.iterdir())])
