"""Output retention: a finished job's images go when its record does.

Job records expire in Redis ``URAE_RESULT_TTL_S`` after the job ends; without a sweep their images
would stay in storage for ever. The API's maintenance thread deletes every ``jobs/<id>/`` prefix
whose record is gone and under which nothing was written for longer than the TTL (so a job that is
still writing, or whose record is momentarily unreadable, is never touched). It works through the
storage interface: the same on a local folder and on an object store.
"""

from __future__ import annotations

import time

import redis

from jobstore.contract import job_key
from jobstore.storage import Storage
from jobstore.usage import release_job_images


def sweep_expired_outputs(conn: redis.Redis, storage: Storage, result_ttl_s: float) -> list[str]:
    """Delete the images of jobs whose records have expired; returns their job ids."""
    last_write: dict[str, float] = {}
    for info in storage.list_objects("jobs"):
        job_id = info.key.split("/")[1]
        last_write[job_id] = max(last_write.get(job_id, 0.0), info.modified)
    cutoff = time.time() - result_ttl_s
    stale = sorted(job_id for job_id, modified in last_write.items() if modified < cutoff)
    if not stale:
        return []
    pipe = conn.pipeline(transaction=False)
    for job_id in stale:
        pipe.exists(job_key(job_id))
    removed = []
    for job_id, exists in zip(stale, pipe.execute(), strict=True):
        if not exists:
            storage.delete(f"jobs/{job_id}")
            release_job_images(conn, job_id)
            removed.append(job_id)
    return removed
