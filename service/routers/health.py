"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from jobstore.contract import (
    FINETUNE_QUEUE,
    GENERATE_QUEUES,
    JOB_COUNTS_KEY,
    TIERS,
    JobKind,
    JobStatus,
)
from jobstore.metrics import peak_memory_lines, stage_lines
from jobstore.queues import rq_queue_key
from jobstore.workers import live_workers
from service.admission import serving_workers
from service.deps import ApiKeyDep, RedisDep, SettingsDep, StorageDep
from service.json_bodies import BoundedJsonRoute

router = APIRouter(route_class=BoundedJsonRoute, tags=["health"])


@router.get("/health")
def health() -> dict[str, str]:
    """The process is alive (no authentication, no Redis)."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "not ready, with the reason"}})
def ready(_: ApiKeyDep, settings: SettingsDep, conn: RedisDep, storage: StorageDep) -> JSONResponse:
    """Redis and the storage answer, and at least one live generation worker serves the configured model."""
    conn.ping()
    storage.exists("ready-probe")  # an unreachable object store answers 503 (StorageUnavailable)
    workers = serving_workers(conn, settings, JobKind.GENERATE)
    body = {"redis": "ok", "storage": "ok", "model": settings.model, "live_workers": len(workers),
            # What the live workers serve, and how (a worker heartbeats only after its warm-up).
            "tiers": sorted({t for w in workers for t in w.get("tiers", ["quality"])}, key=TIERS.index),
            "workers": [{"tiers": w.get("tiers", ["quality"]), "attention_backend": w.get("attention_backend"),
                         "precision": w.get("precision"), "compiled": w.get("compiled", False),
                         # How the worker fits the model in its GPU (URAE_MEMORY_PROFILE).
                         "memory_profile": w.get("memory_profile", "default"),
                         "max_pixels": w.get("max_pixels"),
                         # GPUs the worker splits each image over (URAE_CONTEXT_PARALLEL).
                         "context_parallel": w.get("context_parallel", 1)} for w in workers]}
    if not workers:
        return JSONResponse({**body, "status": "not ready", "detail": f"no live worker for model {settings.model}"}, 503)
    return JSONResponse({**body, "status": "ready"})


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(_: ApiKeyDep, conn: RedisDep) -> PlainTextResponse:
    """Prometheus text format: queue depth, jobs by status, stage durations, workers, adapter cache."""
    queues = (*GENERATE_QUEUES, FINETUNE_QUEUE)
    pipe = conn.pipeline(transaction=False)
    for name in queues:
        pipe.llen(rq_queue_key(name))
    pipe.hgetall(JOB_COUNTS_KEY)
    answers = pipe.execute()
    depths, counts = answers[: len(queues)], answers[len(queues)]
    workers = live_workers(conn)

    lines = ["# HELP urae_queue_depth Jobs waiting in each queue.", "# TYPE urae_queue_depth gauge"]
    lines += [f'urae_queue_depth{{queue="{q}"}} {d}' for q, d in zip(queues, depths, strict=True)]
    lines += ["# HELP urae_jobs_total Jobs that entered each status.", "# TYPE urae_jobs_total counter"]
    decoded = {k.decode(): int(v) for k, v in counts.items()}
    lines += [f'urae_jobs_total{{status="{s}"}} {decoded.get(str(s), 0)}' for s in JobStatus]
    lines += stage_lines(conn)
    lines += ["# HELP urae_live_workers Workers with a fresh heartbeat.", "# TYPE urae_live_workers gauge"]
    for kind in JobKind:
        if kind != JobKind.ADAPTER_IMPORT:
            n = sum(1 for w in workers if kind in w.get("kinds", ()))
            lines.append(f'urae_live_workers{{kind="{kind}"}} {n}')
    lines += ["# HELP urae_adapter_cache_hits_total Adapter requests served from a worker's cache.",
              "# TYPE urae_adapter_cache_hits_total counter",
              f"urae_adapter_cache_hits_total {sum(int(w.get('adapter_hits', 0)) for w in workers)}",
              "# HELP urae_adapter_cache_misses_total Adapter requests that loaded the adapter.",
              "# TYPE urae_adapter_cache_misses_total counter",
              f"urae_adapter_cache_misses_total {sum(int(w.get('adapter_misses', 0)) for w in workers)}"]
    lines += peak_memory_lines(conn)
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
