"""Retention: a finished job's images go when its record does; a job's uploads when the job ends.

Job records expire in Redis ``URAE_RESULT_TTL_S`` after the job ends; without a sweep their images
would stay in storage for ever. The API's maintenance thread deletes every ``jobs/<id>/`` prefix
whose record is gone and under which nothing was written for longer than the TTL (so a job that is
still writing, or whose record is momentarily unreadable, is never touched). It works through the
storage interface: the same on a local folder and on an object store.

An upload (``uploads/<job id>...``: an adapter to import, an input image) belongs to its job, whose
worker deletes it when the job ends. One left behind (a worker that died, a store that was down at
that moment, a job canceled while the store was down) is deleted by the same thread once its job has
ended or its record is gone, and it is older than a grace period (the API stores an upload a moment
before it writes the job's record).
"""

from __future__ import annotations

import time

import redis

from jobstore.contract import TERMINAL_STATUSES, job_key, upload_job_id
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


# An upload younger than this is never swept: its job's record may not be written yet.
UPLOAD_GRACE_S = 600.0


def sweep_orphaned_uploads(conn: redis.Redis, storage: Storage, min_age_s: float = UPLOAD_GRACE_S) -> list[str]:
    """Delete the uploads of jobs that have ended (or whose records are gone); returns their keys."""
    cutoff = time.time() - min_age_s
    candidates = [info.key for info in storage.list_objects("uploads") if info.modified <= cutoff]
    if not candidates:
        return []
    pipe = conn.pipeline(transaction=False)
    for key in candidates:
        pipe.hget(job_key(upload_job_id(key)), "status")
    removed = []
    for key, status in zip(candidates, pipe.execute(), strict=True):
        text = status.decode() if isinstance(status, bytes) else status
        if text is None or text in TERMINAL_STATUSES:
            storage.delete(key)
            removed.append(key)
    return removed
