"""The adapter registry: one JSON record per registered adapter name."""

from __future__ import annotations

import json
from typing import Any

import redis

from jobstore.codec import dumps as _dumps
from jobstore.contract import ADAPTERS_KEY, BUILTIN_ADAPTERS_KEY


def get_adapter(conn: redis.Redis, name: str) -> dict[str, Any] | None:
    raw = conn.hget(ADAPTERS_KEY, name)
    return json.loads(raw) if raw is not None else None


def list_adapters(conn: redis.Redis) -> list[dict[str, Any]]:
    return sorted((json.loads(v) for v in conn.hgetall(ADAPTERS_KEY).values()), key=lambda a: a["name"])


def register_adapter(conn: redis.Redis, record: dict[str, Any]) -> None:
    conn.hset(ADAPTERS_KEY, record["name"], _dumps(record))


def unregister_adapter(conn: redis.Redis, name: str) -> dict[str, Any] | None:
    raw = conn.hget(ADAPTERS_KEY, name)
    if raw is None:
        return None
    conn.hdel(ADAPTERS_KEY, name)
    return json.loads(raw)


def describe_builtin_adapter(conn: redis.Redis, model: str, record: dict[str, Any]) -> None:
    """What a worker found in a built-in adapter's file for ``model`` (each model has its own files)."""
    conn.hset(BUILTIN_ADAPTERS_KEY, f"{model}/{record['name']}", _dumps(record))


def builtin_adapter_description(conn: redis.Redis, model: str, name: str) -> dict[str, Any] | None:
    """The description a worker serving ``model`` recorded for a built-in adapter; None before any did."""
    raw = conn.hget(BUILTIN_ADAPTERS_KEY, f"{model}/{name}")
    return json.loads(raw) if raw is not None else None
