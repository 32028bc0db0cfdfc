"""The worker registry: heartbeats carrying each live worker's capabilities."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from jobstore.codec import dumps as _dumps
from jobstore.codec import text as _text
from jobstore.contract import WORKERS_KEY, worker_key


def publish_worker(conn: redis.Redis, name: str, info: dict[str, Any], ttl_s: float) -> None:
    """A worker's heartbeat: its capabilities and counters, expiring unless refreshed."""
    pipe = conn.pipeline(transaction=False)
    pipe.set(worker_key(name), _dumps({**info, "name": name, "seen_at": time.time()}), px=int(ttl_s * 1000))
    pipe.sadd(WORKERS_KEY, name)
    pipe.execute()


def live_workers(conn: redis.Redis) -> list[dict[str, Any]]:
    """Heartbeat records of every worker alive now; forgets the names of dead ones."""
    names = [_text(n) for n in conn.smembers(WORKERS_KEY)]
    if not names:
        return []
    values = conn.mget([worker_key(n) for n in names])
    dead = [n for n, v in zip(names, values, strict=True) if v is None]
    if dead:
        conn.srem(WORKERS_KEY, *dead)
    return [json.loads(v) for v in values if v is not None]


def remove_worker(conn: redis.Redis, name: str) -> None:
    pipe = conn.pipeline(transaction=False)
    pipe.delete(worker_key(name))
    pipe.srem(WORKERS_KEY, name)
    pipe.execute()
