"""Metrics that workers write to Redis and the API reads: stage-duration histograms."""

from __future__ import annotations

import redis

from jobstore.contract import KEY_PREFIX, STAGE_BUCKETS, STAGE_HISTOGRAM_PREFIX


def observe_stage(conn: redis.Redis, stage: str, seconds: float) -> None:
    """Add one observation to a stage-duration histogram (bucket counts, sum and count in a hash)."""
    bucket = next((f"{b:g}" for b in STAGE_BUCKETS if seconds <= b), "+Inf")
    pipe = conn.pipeline(transaction=False)
    key = STAGE_HISTOGRAM_PREFIX + stage
    pipe.hincrby(key, bucket, 1)
    pipe.hincrby(key, "count", 1)
    pipe.hincrbyfloat(key, "sum", seconds)
    pipe.execute()


# Peak memory of each generation job, by what was measured (the job's timing key of that name):
# the CUDA allocator's peak on a GPU worker, the peak RSS rise on a CPU worker.
PEAK_MEMORY_KEYS = ("peak_gpu_memory_bytes", "peak_rss_delta_bytes")
PEAK_MEMORY_PREFIX = f"{KEY_PREFIX}:metrics:peak_memory:"
PEAK_MEMORY_BUCKETS = tuple(float(gib * 2**30) for gib in (0.25, 0.5, 1, 2, 4, 8, 16, 24, 32, 40, 48, 64, 80, 96, 141))


def observe_peak_memory(conn: redis.Redis, kind: str, nbytes: float) -> None:
    """Add one job's peak memory (bytes) to the histogram of ``kind`` (one of PEAK_MEMORY_KEYS)."""
    bucket = next((f"{b:g}" for b in PEAK_MEMORY_BUCKETS if nbytes <= b), "+Inf")
    pipe = conn.pipeline(transaction=False)
    key = PEAK_MEMORY_PREFIX + kind
    pipe.hincrby(key, bucket, 1)
    pipe.hincrby(key, "count", 1)
    pipe.hincrbyfloat(key, "sum", nbytes)
    pipe.execute()


def peak_memory_lines(conn: redis.Redis) -> list[str]:
    """Prometheus text lines: a histogram of job peak memory per measure (gpu_memory, rss_delta)."""
    pipe = conn.pipeline(transaction=False)
    for kind in PEAK_MEMORY_KEYS:
        pipe.hgetall(PEAK_MEMORY_PREFIX + kind)
    answers = pipe.execute()
    lines = ["# HELP urae_job_peak_memory_bytes Peak memory of each generation job (CUDA allocator peak on a GPU, "
             "peak RSS rise on a CPU).", "# TYPE urae_job_peak_memory_bytes histogram"]
    for kind, raw in zip(PEAK_MEMORY_KEYS, answers, strict=True):
        hist = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
        measure = kind.removeprefix("peak_").removesuffix("_bytes")
        cumulative = 0
        for bound in PEAK_MEMORY_BUCKETS:
            cumulative += int(hist.get(f"{bound:g}", 0))
            lines.append(f'urae_job_peak_memory_bytes_bucket{{measure="{measure}",le="{bound:g}"}} {cumulative}')
        count = int(hist.get("count", 0))
        lines.append(f'urae_job_peak_memory_bytes_bucket{{measure="{measure}",le="+Inf"}} {count}')
        lines.append(f'urae_job_peak_memory_bytes_sum{{measure="{measure}"}} {float(hist.get("sum", 0.0))}')
        lines.append(f'urae_job_peak_memory_bytes_count{{measure="{measure}"}} {count}')
    return lines
