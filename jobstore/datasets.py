"""The dataset registry: who uploaded each dataset, its size, and when a fine-tune last used it.

A dataset is a folder of objects under ``datasets/<name>/`` in storage plus one JSON record here.
Fine-tune jobs that use a dataset are remembered with it, so it is never deleted (by a client or by
retention) while a queued or running job still needs it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis

from jobstore.codec import dumps as _dumps
from jobstore.codec import text as _text
from jobstore.contract import KEY_PREFIX, JobStatus, dataset_prefix, job_key
from jobstore.usage import charge

log = logging.getLogger("urae.jobstore")

DATASETS_KEY = f"{KEY_PREFIX}:datasets"  # hash dataset name -> JSON record
_ACTIVE = (str(JobStatus.QUEUED), str(JobStatus.STARTED))


def dataset_jobs_key(name: str) -> str:
    """Set of fine-tune job ids that were submitted with this dataset."""
    return f"{KEY_PREFIX}:dataset:{name}:jobs"


def get_dataset(conn: redis.Redis, name: str) -> dict[str, Any] | None:
    raw = conn.hget(DATASETS_KEY, name)
    return json.loads(raw) if raw is not None else None


def list_datasets(conn: redis.Redis) -> list[dict[str, Any]]:
    return sorted((json.loads(v) for v in conn.hgetall(DATASETS_KEY).values()), key=lambda d: d["name"])


def register_dataset(conn: redis.Redis, name: str, owner: str, size_bytes: int, files: int, images: int) -> dict[str, Any]:
    """Record a freshly stored dataset and charge its bytes to ``owner``."""
    now = time.time()
    record = {"name": name, "owner": owner, "size_bytes": int(size_bytes), "files": int(files),
              "images": int(images), "created_at": now, "last_used_at": None}
    conn.hset(DATASETS_KEY, name, _dumps(record))
    charge(conn, owner, int(size_bytes))
    return record


def use_dataset(conn: redis.Redis, name: str, job_id: str, pipeline: Any = None) -> None:
    """A fine-tune was queued with this dataset: remember the job and the time (in ``pipeline``, the
    transaction that queues the job, when given)."""
    record = get_dataset(conn, name)
    pipe = pipeline if pipeline is not None else conn.pipeline()
    if record is not None:
        record["last_used_at"] = time.time()
        pipe.hset(DATASETS_KEY, name, _dumps(record))
    pipe.sadd(dataset_jobs_key(name), job_id)
    if pipeline is None:
        pipe.execute()


def active_jobs(conn: redis.Redis, name: str) -> list[str]:
    """Queued or running fine-tunes that use the dataset; forgets the ones that ended."""
    members = [_text(m) for m in conn.smembers(dataset_jobs_key(name))]
    if not members:
        return []
    pipe = conn.pipeline(transaction=False)
    for job_id in members:
        pipe.hget(job_key(job_id), "status")
    active: list[str] = []
    ended: list[str] = []
    for job_id, status in zip(members, pipe.execute(), strict=True):
        (active if status is not None and _text(status) in _ACTIVE else ended).append(job_id)
    if ended:
        conn.srem(dataset_jobs_key(name), *ended)
    return active


def delete_dataset(conn: redis.Redis, storage: Any, name: str) -> dict[str, Any] | None:
    """Delete a dataset's objects and record and release its bytes; None when it was not registered."""
    pipe = conn.pipeline()
    pipe.hget(DATASETS_KEY, name)
    pipe.hdel(DATASETS_KEY, name)
    raw, removed = pipe.execute()
    if raw is None or removed != 1:
        return None
    record: dict[str, Any] = json.loads(raw)
    storage.delete(dataset_prefix(name))
    conn.delete(dataset_jobs_key(name))
    charge(conn, record.get("owner", ""), -int(record.get("size_bytes", 0)))
    return record


def sweep_unused_datasets(conn: redis.Redis, storage: Any, ttl_s: float) -> list[str]:
    """Delete the datasets no fine-tune has used for ``ttl_s`` (counted from the upload when never used)."""
    if ttl_s <= 0:
        return []
    cutoff = time.time() - ttl_s
    removed = []
    for record in list_datasets(conn):
        last = record.get("last_used_at") or record.get("created_at") or 0.0
        if last >= cutoff or active_jobs(conn, record["name"]):
            continue
        if delete_dataset(conn, storage, record["name"]) is not None:
            removed.append(record["name"])
    return removed
