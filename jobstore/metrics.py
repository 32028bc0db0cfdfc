"""Metrics that workers write to Redis and the API reads: histograms of stage durations and peak memory."""

from __future__ import annotations

import redis

from jobstore.contract import KEY_PREFIX, STAGE_BUCKETS, STAGE_HISTOGRAM_PREFIX, STAGE_NAMES


def _observe(conn: redis.Redis, key: str, buckets: tuple[float, ...], value: float) -> None:
    """Add one observation to a histogram kept in a Redis hash (bucket counts, sum and count)."""
    bucket = next((f"{b:g}" for b in buckets if value <= b), "+Inf")
    pipe = conn.pipeline(transaction=False)
    pipe.hincrby(key, bucket, 1)
    pipe.hincrby(key, "count", 1)
    pipe.hincrbyfloat(key, "sum", value)
    pipe.execute()


def histogram_lines(
    name: str, help_text: str, label: str, buckets: tuple[float, ...], series: dict[str, dict]
) -> list[str]:
    """Prometheus text lines of histograms kept by ``_observe``; ``series``: label value -> raw hash."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for value, raw in series.items():
        hist = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
        cumulative = 0
        for bound in buckets:
            cumulative += int(hist.get(f"{bound:g}", 0))
            lines.append(f'{name}_bucket{{{label}="{value}",le="{bound:g}"}} {cumulative}')
        count = int(hist.get("count", 0))
        lines.append(f'{name}_bucket{{{label}="{value}",le="+Inf"}} {count}')
        lines.append(f'{name}_sum{{{label}="{value}"}} {float(hist.get("sum", 0.0))}')
        lines.append(f'{name}_count{{{label}="{value}"}} {count}')
    return lines


def observe_stage(conn: redis.Redis, stage: str, seconds: float) -> None:
    """Add one observation to a stage-duration histogram."""
    _observe(conn, STAGE_HISTOGRAM_PREFIX + stage, STAGE_BUCKETS, seconds)


def stage_lines(conn: redis.Redis) -> list[str]:
    """Prometheus text lines: the stage-duration histograms."""
    pipe = conn.pipeline(transaction=False)
    for stage in STAGE_NAMES:
        pipe.hgetall(STAGE_HISTOGRAM_PREFIX + stage)
    series = dict(zip(STAGE_NAMES, pipe.execute(), strict=True))
    return histogram_lines("urae_stage_duration_seconds", "Time spent in each stage of a job.", "stage",
                           STAGE_BUCKETS, series)


# Peak memory of each generation job, by what was measured (the job's timing key of that name):
# the CUDA allocator's peak on a GPU worker, the peak RSS rise on a CPU worker.
PEAK_MEMORY_KEYS = ("peak_gpu_memory_bytes", "peak_rss_delta_bytes")
PEAK_MEMORY_PREFIX = f"{KEY_PREFIX}:metrics:peak_memory:"
PEAK_MEMORY_BUCKETS = tuple(float(gib * 2**30) for gib in (0.25, 0.5, 1, 2, 4, 8, 16, 24, 32, 40, 48, 64, 80, 96, 141))


def observe_peak_memory(conn: redis.Redis, kind: str, nbytes: float) -> None:
    """Add one job's peak memory (bytes) to the histogram of ``kind`` (one of PEAK_MEMORY_KEYS)."""
    _observe(conn, PEAK_MEMORY_PREFIX + kind, PEAK_MEMORY_BUCKETS, nbytes)


def peak_memory_lines(conn: redis.Redis) -> list[str]:
    """Prometheus text lines: a histogram of job peak memory per measure (gpu_memory, rss_delta)."""
    pipe = conn.pipeline(transaction=False)
    for kind in PEAK_MEMORY_KEYS:
        pipe.hgetall(PEAK_MEMORY_PREFIX + kind)
    series = {kind.removeprefix("peak_").removesuffix("_bytes"): raw
              for kind, raw in zip(PEAK_MEMORY_KEYS, pipe.execute(), strict=True)}
    return histogram_lines(
        "urae_job_peak_memory_bytes",
        "Peak memory of each generation job (CUDA allocator peak on a GPU, peak RSS rise on a CPU).",
        "measure", PEAK_MEMORY_BUCKETS, series,
    )
