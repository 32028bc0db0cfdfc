"""Admission: refuse what cannot or should not be queued, before anything is queued.

Backpressure is by rejection (429 with Retry-After), not by an unbounded queue; a request that no
live worker can serve is refused at once instead of waiting forever.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterable
from typing import Any

import redis

from jobstore.contract import ADAPTERS_KEY, BUILTIN_ADAPTERS, GENERATE_QUEUES, TIERS, JobKind
from jobstore.jobs import JobRecords
from jobstore.queues import rq_queue_key
from jobstore.settings import Settings
from jobstore.usage import usage
from jobstore.workers import live_workers
from service.auth import Principal
from service.json_bodies import parse_bounded


class ApiError(Exception):
    """An error answer: HTTP status, a readable one-line message, optionally the field at fault."""

    def __init__(self, status: int, detail: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.headers = headers or {}


def field_path(loc: Iterable[str | int]) -> str:
    """The one way error answers name an input: ``adapters[0].name``, ``recipe.targets[1]``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def parse_json_field(text: str, field: str) -> Any:
    """A JSON value sent as text (a form field); 422 naming the field for anything refused: bad syntax,
    nesting deeper than MAX_JSON_DEPTH, integers longer than Python converts."""
    try:
        return parse_bounded(text)
    except ValueError as exc:
        raise ApiError(422, f"{field}: {exc}", field=field) from None


def check_adapters_exist(
    conn: redis.Redis, names: list[str], principal: Principal | None = None, field: str = "adapters[{index}].name"
) -> dict[str, str]:
    """422 naming the first adapter that is neither built in nor registered (nor visible to the
    caller: another key's adapter answers exactly like a missing one). Returns the version of every
    registered adapter named, to pin the job to the files it was submitted with."""
    custom = [n for n in names if n not in BUILTIN_ADAPTERS]
    if not custom:
        return {}
    registered = dict(zip(custom, conn.hmget(ADAPTERS_KEY, custom), strict=True))
    versions: dict[str, str] = {}
    for index, name in enumerate(names):
        if name not in registered:
            continue
        raw = registered[name]
        record = json.loads(raw) if raw is not None else None
        if record is None or (principal is not None and not principal.can_access(record.get("owner"))):
            raise ApiError(422, f"adapter {name!r} does not exist (see GET /adapters)", field=field.format(index=index))
        versions[name] = str(record.get("version", ""))
    return versions


def queued_limit_error(settings: Settings) -> ApiError:
    """429: the key already has its maximum of jobs waiting."""
    limit = settings.max_queued_jobs_per_key
    return ApiError(
        429,
        f"this API key already has {limit} jobs waiting (URAE_MAX_QUEUED_JOBS_PER_KEY); retry when some have started",
        headers={"Retry-After": str(settings.retry_after_s)},
    )


def check_queued_per_key(records: JobRecords, principal: Principal, settings: Settings) -> None:
    """429 with Retry-After when this key already has its maximum of jobs waiting: the early answer,
    before an upload is read. The exact check is the one ``create_and_enqueue(max_queued=...)`` makes
    atomically when the job is written."""
    limit = settings.max_queued_jobs_per_key
    if limit and records.queued_count(principal.key_id) >= limit:
        raise queued_limit_error(settings)


def storage_left(conn: redis.Redis, principal: Principal, settings: Settings) -> int | None:
    """Bytes this key may still store; None without a quota."""
    if not settings.storage_quota_bytes:
        return None
    return max(0, settings.storage_quota_bytes - usage(conn, principal.key_id))


def quota_error(settings: Settings, left: int, incoming: int | None, field: str | None) -> ApiError:
    """413: what the key stores plus ``incoming`` bytes would exceed its quota."""
    used = settings.storage_quota_bytes - left
    size = f"{incoming} more bytes" if incoming is not None else "this upload"
    return ApiError(
        413,
        f"storage quota exceeded: this API key stores {used} of its {settings.storage_quota_bytes} bytes "
        f"(URAE_STORAGE_QUOTA_BYTES) and {size} would not fit; delete datasets or adapters, or wait for old "
        f"images to expire",
        field=field,
    )


def check_storage_quota(
    conn: redis.Redis, principal: Principal, settings: Settings, incoming: int | None, field: str | None
) -> int | None:
    """Refuse (413) before anything is stored when the key is over its quota or ``incoming`` bytes
    (a declared Content-Length) do not fit. Returns the bytes left (None: no quota), to bound the
    copy while the bytes arrive."""
    left = storage_left(conn, principal, settings)
    if left is None:
        return None
    if left <= 0 or (incoming is not None and incoming > left):
        raise quota_error(settings, left, incoming, field)
    return left


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
    conn: redis.Redis,
    settings: Settings,
    width: int,
    height: int,
    directory: WorkerDirectory | None = None,
    tier: str = "quality",
    adapters: int = 0,
) -> None:
    """Refuse a tier, a size at that tier, or more adapters at once than any live worker advertises
    it can generate (``adapters``: how many one image mixes, the preset's included)."""
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
    # A worker from before tiers existed serves quality only.
    served = sorted({t for w in workers for t in w.get("tiers", ["quality"])}, key=TIERS.index)
    workers = [w for w in workers if tier in w.get("tiers", ["quality"])]
    if not workers:
        raise ApiError(
            422,
            f"no live worker serves the {tier} tier (served now: {', '.join(served)}); fast needs fp8 GPU workers",
            field="tier",
        )
    largest = max(int(w.get("max_pixels", 0)) for w in workers)
    if width * height > largest:
        raise ApiError(
            422,
            f"{width}x{height} is {width * height:,} pixels, larger than any live worker can generate "
            f"(the largest takes {largest:,} pixels, see URAE_WORKER_MAX_PIXELS)",
            field="width",
        )
    # Workers from before adapter slots existed do not advertise them: no limit known.
    slots = [int(w["adapter_slots"]) for w in workers if "adapter_slots" in w]
    if slots and len(slots) == len(workers) and adapters > max(slots):
        raise ApiError(
            422,
            f"{adapters} adapters at once (the preset's included) is more than any live worker mixes "
            f"(at most {max(slots)}, see URAE_ADAPTER_SLOTS)",
            field="adapters",
        )


def adapters_per_image(preset: str, names: list[str]) -> int:
    """How many adapters an image of this preset mixes: the user's plus the preset's URAE adapter
    (2k, 4k), which the worker puts first unless the user already names it."""
    own = {"1k": set(), "2k": {"urae-2k"}, "4k": {"urae-4k", "urae-4k-schnell"}}[preset]
    return len(set(names)) + (1 if own and not own & set(names) else 0)


def generate_queue_lengths(conn: redis.Redis) -> dict[str, int]:
    """Length of every generation queue, in priority order (one round trip)."""
    pipe = conn.pipeline(transaction=False)
    for name in GENERATE_QUEUES:
        pipe.llen(rq_queue_key(name))
    return dict(zip(GENERATE_QUEUES, (int(n) for n in pipe.execute()), strict=True))


def check_name_free(conn: redis.Redis, principal: Principal, name: str, replace: bool, field: str) -> str:
    """409 unless ``name`` may receive a new adapter: unused, or the caller's own and ``replace``.

    Adapter names are one namespace for every key: another key's name is taken, whatever ``replace``
    says (an admin may replace any). Returns what the name holds now ("" or the version replaced),
    for the worker to check that nobody else took the name in the meantime.
    """
    if name in BUILTIN_ADAPTERS:
        raise ApiError(409, f"{name!r} is the name of a built-in adapter", field=field)
    raw = conn.hget(ADAPTERS_KEY, name)
    if raw is None:
        return ""
    record = json.loads(raw)
    if not principal.can_access(record.get("owner")):
        raise ApiError(409, f"the adapter name {name!r} is taken; choose another name", field=field)
    if not replace:
        raise ApiError(409, f"adapter {name!r} already exists (send replace=true to replace it)", field=field)
    return str(record.get("version", ""))


def declared_length(request: Any) -> int | None:
    """The request's Content-Length, when it declares a sane one."""
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() and len(value) <= 18 else None
