"""Storage accounting per key: bytes of images, datasets and adapters each key keeps on the server.

Counted in Redis as the objects are written and deleted (never by walking a directory), so the same
numbers hold for any storage backend. The images of a job are charged to its owner when the job
finishes and released when retention deletes them.
"""

from __future__ import annotations

import redis

from jobstore.codec import text as _text
from jobstore.contract import KEY_PREFIX

USAGE_KEY = f"{KEY_PREFIX}:usage"  # hash key id -> bytes stored
JOB_BYTES_KEY = f"{KEY_PREFIX}:usage:jobs"  # hash job id -> "<owner> <bytes>" of its stored images


def usage(conn: redis.Redis, owner: str) -> int:
    """Bytes charged to ``owner`` now."""
    value = conn.hget(USAGE_KEY, owner)
    return max(0, int(value)) if value is not None else 0


def charge(conn: redis.Redis, owner: str, delta: int) -> None:
    """Add (or, negative, release) ``delta`` bytes to ``owner``'s usage."""
    if delta:
        conn.hincrby(USAGE_KEY, owner, int(delta))


def charge_job_images(conn: redis.Redis, job_id: str, owner: str, nbytes: int) -> None:
    """Charge a finished job's images to its owner, remembered until retention deletes them."""
    pipe = conn.pipeline()
    pipe.hincrby(USAGE_KEY, owner, int(nbytes))
    pipe.hset(JOB_BYTES_KEY, job_id, f"{owner} {int(nbytes)}")
    pipe.execute()


def release_job_images(conn: redis.Redis, job_id: str) -> None:
    """Give back the bytes of a job's images (they were deleted)."""
    pipe = conn.pipeline()
    pipe.hget(JOB_BYTES_KEY, job_id)
    pipe.hdel(JOB_BYTES_KEY, job_id)
    raw, removed = pipe.execute()
    if raw is None or removed != 1:
        return  # nothing charged, or another sweeper released it
    owner, _, nbytes = _text(raw).rpartition(" ")
    conn.hincrby(USAGE_KEY, owner, -int(nbytes))
