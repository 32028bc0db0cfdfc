"""Admission: refuse what cannot or should not be queued, before anything is queued.

Backpressure is by rejection (429 with Retry-After), not by an unbounded queue; a request that no
live worker can serve is refused at once instead of waiting forever.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import redis

from jobstore.contract import ADAPTERS_KEY, BUILTIN_ADAPTERS, GENERATE_QUEUES, JobKind
from jobstore.queues import rq_queue_key
from jobstore.settings import Settings
from jobstore.workers import live_workers


class ApiError(Exception):
    """An error answer: HTTP status, a readable one-line message, optionally the field at fault."""

    def __init__(self, status: int, detail: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.headers = headers or {}


def check_adapters_exist(conn: redis.Redis, names: list[str]) -> None:
    """422 naming the first adapter that is neither built in nor registered."""
    custom = [n for n in names if n not in BUILTIN_ADAPTERS]
    if not custom:
        return
    registered = dict(zip(custom, conn.hmget(ADAPTERS_KEY, custom), strict=True))
    for index, name in enumerate(names):
        if name in registered and registered[name] is None:
            raise ApiError(422, f"adapter {name!r} does not exist (see GET /adapters)", field=f"adapters[{index}].name")


def check_queue_depth(conn: redis.Redis, queue: str, settings: Settings, depth: int | None = None) -> None:
    """429 with Retry-After when the queue already holds its maximum (``depth``: already read)."""
    if depth is None:
        depth = int(conn.llen(rq_queue_key(queue)))
    if depth >= settings.max_queue_depth:
        raise ApiError(
            429,
            f"queue {queue} is full ({depth} jobs waiting, the maximum is {settings.max_queue_depth}); retry later",
            headers={"Retry-After": str(settings.retry_after_s)},
        )


def serving_workers(conn: redis.Redis, settings: Settings, kind: JobKind) -> list[dict[str, Any]]:
    """Live workers of the configured model that serve this kind of job."""
    return [w for w in live_workers(conn) if w.get("model") == settings.model and kind in w.get("kinds", ())]


class WorkerDirectory:
    """The live workers, re-read at most every ``max_age_s``: admission of every request needs them,
    and heartbeats change them only every few seconds."""

    def __init__(self, max_age_s: float):
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._read_at = -math.inf
        self._workers: list[dict[str, Any]] = []

    def serving(self, conn: redis.Redis, settings: Settings, kind: JobKind) -> list[dict[str, Any]]:
        with self._lock:
            if time.monotonic() - self._read_at >= self.max_age_s:
                self._workers = live_workers(conn)
                self._read_at = time.monotonic()
            workers = self._workers
        return [w for w in workers if w.get("model") == settings.model and kind in w.get("kinds", ())]


def check_capability(
    conn: redis.Redis, settings: Settings, width: int, height: int, directory: WorkerDirectory | None = None
) -> None:
    """Refuse a size that no live worker advertises it can generate."""
    if directory is not None:
        workers = directory.serving(conn, settings, JobKind.GENERATE)
    else:
        workers = serving_workers(conn, settings, JobKind.GENERATE)
    if not workers:
        if settings.require_live_worker:
            raise ApiError(
                503,
                f"no live generation worker for model {settings.model}; retry later",
                headers={"Retry-After": str(settings.retry_after_s)},
            )
        return
    largest = max(int(w.get("max_pixels", 0)) for w in workers)
    if width * height > largest:
        raise ApiError(
            422,
            f"{width}x{height} ({width * height} pixels) is larger than any live worker can generate "
            f"(the largest takes {largest} pixels)",
            field="width",
        )


def generate_queue_lengths(conn: redis.Redis) -> dict[str, int]:
    """Length of every generation queue, in priority order (one round trip)."""
    pipe = conn.pipeline(transaction=False)
    for name in GENERATE_QUEUES:
        pipe.llen(rq_queue_key(name))
    return dict(zip(GENERATE_QUEUES, (int(n) for n in pipe.execute()), strict=True))
