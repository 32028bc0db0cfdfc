"""Metrics that workers write to Redis and the API reads: stage-duration histograms."""

from __future__ import annotations

import redis

from jobstore.contract import STAGE_BUCKETS, STAGE_HISTOGRAM_PREFIX


def observe_stage(conn: redis.Redis, stage: str, seconds: float) -> None:
    """Add one observation to a stage-duration histogram (bucket counts, sum and count in a hash)."""
    bucket = next((f"{b:g}" for b in STAGE_BUCKETS if seconds <= b), "+Inf")
    pipe = conn.pipeline(transaction=False)
    key = STAGE_HISTOGRAM_PREFIX + stage
    pipe.hincrby(key, bucket, 1)
    pipe.hincrby(key, "count", 1)
    pipe.hincrbyfloat(key, "sum", seconds)
    pipe.execute()
