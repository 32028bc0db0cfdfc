"""The FastAPI application: wiring, error translation and the background reaper."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import redis
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobstore.datasets import sweep_unused_datasets
from jobstore.jobs import JobRecords, QueuedLimitReached
from jobstore.queues import connect
from jobstore.retention import sweep_expired_outputs, sweep_orphaned_uploads
from jobstore.settings import Settings, get_settings
from jobstore.storage import Storage, StorageKeyError, StorageUnavailable, open_storage
from service.admission import ApiError, WorkerDirectory, field_path, queued_limit_error
from service.auth import AuthMiddleware
from service.event_streams import EventHub
from service.json_bodies import json_problem
from service.limits import (
    UPLOAD_THREADS,
    BodyLimitMiddleware,
    BodyLimits,
    bounded_httptools_protocol,
    effective_max_connections,
    max_event_streams,
)
from service.routers import adapters, config, datasets, finetune, generate, health, jobs, playground
from service.uploads import DISK_FULL_ERRNOS

log = logging.getLogger("urae.service")

DESCRIPTION = """
Ultra-high-resolution (2K/4K) FLUX.1 text-to-image generation with URAE adapters, and URAE fine-tuning.
Every route except `/health` (and the playground's static files) needs `Authorization: Bearer <key>`;
a request without a valid key is refused with 401 before its body is read. Each key is a tenant: it
sees only the jobs, datasets and adapters it created (admin keys see everything).
"""


# Writes that fail because the disk (or a quota, or a file size limit) is full: the server's problem.
DISK_FULL_BODY = {"detail": "the server is out of storage space; nothing was stored, retry later"}
DISK_FULL_RETRY_S = 60

# How often the maintenance thread looks for the images of expired jobs.
OUTPUT_SWEEP_INTERVAL_S = 300.0


def _reaper(records: JobRecords, storage: Storage, settings: Settings, stop: threading.Event) -> None:
    # Fails (or retries) jobs whose worker died, even when no worker is left to notice; deletes the
    # images of jobs whose records have expired.
    next_sweep = 0.0
    while not stop.wait(settings.reaper_interval_s):
        try:
            for job_id in records.reap_orphans(settings.lease_ttl_s, settings.retry_orphaned_jobs):
                log.warning("job %s lost its worker", job_id)
            records.take_back_claims(settings.lease_ttl_s)
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + OUTPUT_SWEEP_INTERVAL_S
                removed = sweep_expired_outputs(records.conn, storage, settings.result_ttl_s)
                if removed:
                    log.info("deleted the images of %d expired job(s)", len(removed))
                uploads = sweep_orphaned_uploads(records.conn, storage)
                if uploads:
                    log.info("deleted %d upload(s) of ended jobs", len(uploads))
                unused = sweep_unused_datasets(records.conn, storage, settings.dataset_ttl_s)
                if unused:
                    log.info("deleted %d dataset(s) unused for %d s: %s", len(unused), settings.dataset_ttl_s, unused)
        except (redis.RedisError, StorageUnavailable):
            pass  # Redis or the object store down: the 503 answers report it; try again next round


def _notice_shutdown() -> asyncio.Event:
    """An event set when the process is told to stop (SIGTERM/SIGINT), before the server waits for open
    connections: event streams watch it and tell their clients to reconnect, so they end at once."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def chained(signum: int, frame: Any, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(event.set)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

        try:
            signal.signal(sig, chained)
        except ValueError:
            break  # not the main thread (an in-process test client): nothing to chain onto
    return event


async def _end_streams_on_shutdown(app: FastAPI) -> None:
    await app.state.shutting_down.wait()
    app.state.event_hub.shut_down()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API. ``settings`` default to the environment (URAE_*)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.open_access:
            log.warning("OPEN DEVELOPMENT MODE: no API keys configured, every request is accepted")
        app.state.settings = settings
        app.state.redis = connect(settings.redis_url, settings.redis_socket_timeout_s)
        # Short commands only (event streams wait on the hub's own connection): a bounded pool, where a
        # request waits briefly for a free connection instead of failing.
        app.state.aredis = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=settings.redis_max_connections,
            timeout=settings.redis_socket_timeout_s, socket_timeout=settings.redis_socket_timeout_s,
            socket_connect_timeout=settings.redis_socket_timeout_s,
        ))
        app.state.event_hub = EventHub(
            settings.redis_url, settings.redis_socket_timeout_s, max_streams=max_event_streams(settings),
            max_streams_per_key=settings.max_event_streams_per_key, retry_after_s=settings.retry_after_s,
        )
        app.state.upload_threads = anyio.CapacityLimiter(UPLOAD_THREADS)
        app.state.records = JobRecords(app.state.redis, settings.result_ttl_s)
        app.state.storage = open_storage(settings)
        app.state.workers = WorkerDirectory(settings.worker_info_cache_s)
        app.state.shutting_down = _notice_shutdown()
        tell_streams = asyncio.get_running_loop().create_task(_end_streams_on_shutdown(app))
        stop = threading.Event()
        reaper = threading.Thread(
            target=_reaper, args=(app.state.records, app.state.storage, settings, stop), name="reaper", daemon=True
        )
        reaper.start()
        try:
            yield
        finally:
            stop.set()
            reaper.join(timeout=5)
            tell_streams.cancel()
            await app.state.event_hub.close()
            await app.state.aredis.aclose()
            app.state.redis.close()

    app = FastAPI(title="urae-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    for router in (generate.router, jobs.router, adapters.router, finetune.router, datasets.router, health.router,
                   config.router, playground.router):
        app.include_router(router)
    # Outermost of the application's own layers: a request without a valid key never reaches the
    # router, so its body is never read.
    app.add_middleware(AuthMiddleware, settings=settings)
    # Outside it: bodies are bounded per route while they arrive, whoever sends them, and an answer
    # given before the body was read (a 401) closes the connection instead of draining the body.
    app.add_middleware(BodyLimitMiddleware, limits=BodyLimits.from_settings(settings))
    _install_error_handlers(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        body: dict[str, object] = {"detail": exc.detail}
        if exc.field:
            body["field"] = exc.field
        return JSONResponse(body, exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = list(first["loc"])
        if first.get("type") == "json_invalid":
            # pydantic puts the byte offset where a field name goes: the field is the body itself.
            offset = next((p for p in loc if isinstance(p, int)), None)
            ctx: Any = first.get("ctx") or {}
            cause = ctx.get("error", "JSON decode error")
            where = f" at byte {offset}" if offset is not None else ""
            return JSONResponse({"detail": f"body: not valid JSON{where}: {cause}", "field": "body",
                                 "errors": _plain(errors)}, 422)
        # The request part ("body", "query", "path", "header") is not part of the field's name.
        field = field_path(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc) or None
        reason = str(first["msg"]).removeprefix("Value error, ")
        detail = f"{field}: {reason}" if field else reason
        return JSONResponse({"detail": detail, "field": field, "errors": _plain(errors)}, 422)

    @app.exception_handler(QueuedLimitReached)
    async def queued_limit(request: Request, _: QueuedLimitReached) -> JSONResponse:
        error = queued_limit_error(request.app.state.settings)
        return JSONResponse({"detail": error.detail}, error.status, headers=error.headers)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def redis_down(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "the job store (Redis) is unavailable; retry later"}, 503, headers={"Retry-After": "5"})

    @app.exception_handler(OSError)
    async def storage_failure(request: Request, exc: OSError) -> JSONResponse:
        if exc.errno in DISK_FULL_ERRNOS:
            log.error("storage full while serving %s %s: %s", request.method, request.url.path, exc.strerror)
            return JSONResponse(DISK_FULL_BODY, 507, headers={"Retry-After": str(DISK_FULL_RETRY_S)})
        log.error("I/O error while serving %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error: the server could not read or write its storage"}, 500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Any:
        # FastAPI turns any failure while parsing a form into "400: error parsing the body"; when the
        # cause was a full temp disk the server is at fault, not the client.
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            log.error("storage full while reading the body of %s %s", request.method, request.url.path)
            return JSONResponse(DISK_FULL_BODY, 507, headers={"Retry-After": str(DISK_FULL_RETRY_S)})
        # A JSON body the parser gave up on (nested deeper than it recurses, an integer longer than
        # Python converts): the client's input, named like any other unreadable body.
        content_type = request.headers.get("content-type", "")
        if exc.status_code == 400 and isinstance(cause, RecursionError | ValueError) and (
                not content_type or "json" in content_type):
            return JSONResponse({"detail": f"body: {json_problem(cause)}", "field": "body"}, 422)
        return await http_exception_handler(request, exc)

    @app.exception_handler(StorageUnavailable)
    async def storage_down(_: Request, exc: StorageUnavailable) -> JSONResponse:
        log.warning("storage unavailable: %s", exc)
        return JSONResponse({"detail": "the object store is unavailable; retry later"}, 503, headers={"Retry-After": "5"})

    @app.exception_handler(StorageKeyError)
    async def bad_key(_: Request, exc: StorageKeyError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 400)


def _plain(errors: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for e in errors:
        out.append({"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))})
    return out


def main() -> None:
    """``urae-api``: serve the API with uvicorn (host/port from URAE_API_HOST / URAE_API_PORT)."""
    import os
    import sys

    import uvicorn

    from jobstore.settings import SettingsError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = get_settings()
    except SettingsError as exc:
        print(f"urae-api: refusing to start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    host = os.environ.get("URAE_API_HOST", "127.0.0.1")
    port = int(os.environ.get("URAE_API_PORT", "8000"))
    uvicorn.run(
        create_app(settings), host=host, port=port, log_level="info",
        # uvicorn bounds neither the size of the request headers, nor the time to send them, nor the
        # connections open at once, nor, without this, the shutdown.
        http=bounded_httptools_protocol(settings.max_header_bytes, settings.header_timeout_s,
                                        effective_max_connections(settings)),
        timeout_graceful_shutdown=max(1, math.ceil(settings.api_shutdown_grace_s)),
    )

