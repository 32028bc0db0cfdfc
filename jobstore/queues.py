"""Connections to Redis and RQ queues, shared by the API and the workers."""

from __future__ import annotations

import redis
from rq import Queue
from rq.serializers import JSONSerializer


def connect(url: str, socket_timeout_s: float = 2.0) -> redis.Redis:
    """A Redis client with short timeouts, so an outage is an error at once and not a hang."""
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        health_check_interval=30,
        decode_responses=False,
    )


def rq_queue(conn: redis.Redis, name: str) -> Queue:
    """An RQ queue with the JSON serializer: nothing read from Redis can run code in a worker."""
    return Queue(name, connection=conn, serializer=JSONSerializer)


def rq_queue_key(name: str) -> str:
    """The Redis list behind an RQ queue (its length is the queue's depth)."""
    return f"{Queue.redis_queue_namespace_prefix}{name}"
