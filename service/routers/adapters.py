"""The adapter registry: list, inspect, upload (validated and converted by a worker), delete.

POST /adapters waits (bounded by URAE_ADAPTER_IMPORT_WAIT_S, on the event loop: no server thread is
held) for the conversion job: 201 with the
adapter when it finished in time, 422 when the file was refused, else 202 with the job to follow.
DELETE removes the name at once; queued jobs that use it fail when they start, with a message naming
the deleted adapter; a job already running keeps the weights it loaded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Annotated, Any

import anyio
import anyio.to_thread
import redis
import redis.asyncio as aioredis
from fastapi import APIRouter, File, Form, Path, Request, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from jobstore.adapters import builtin_adapter_description, get_adapter, list_adapters, unregister_adapter
from jobstore.contract import (
    ADAPTER_IMPORT_QUEUE,
    ADAPTER_NAME_PATTERN,
    BUILTIN_ADAPTERS,
    NO_BASE_ADAPTER,
    TERMINAL_STATUSES,
    AdapterImportPayload,
    JobKind,
    JobStatus,
    job_key,
    upload_object,
)
from jobstore.jobs import JobRecords, new_job_id
from jobstore.settings import Settings
from jobstore.storage import Storage, StorageUnavailable
from jobstore.usage import charge
from service.admission import (
    ApiError,
    check_adapters_exist,
    check_name_free,
    check_queue_depth,
    check_queued_per_key,
    check_storage_quota,
    declared_length,
    quota_error,
)
from service.auth import Principal
from service.deps import ApiKeyDep, RecordsDep, RedisDep, SettingsDep, StorageDep
from service.json_bodies import BoundedJsonRoute
from service.routers.jobs import job_public
from service.schemas import AdapterList, AdapterPublic, ErrorBody, JobPublic
from service.uploads import SafetensorsSummary, UploadError, check_safetensors, spooled_upload

router = APIRouter(route_class=BoundedJsonRoute, prefix="/adapters", tags=["adapters"])
log = logging.getLogger("urae.service")

# How often a waiting upload looks at its import job.
_IMPORT_POLL_S = 0.05

AdapterName = Annotated[str, Path(pattern=ADAPTER_NAME_PATTERN, description="lower-case letters, digits, - and _")]
ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody}}


def _builtin(conn: redis.Redis, settings: Settings, name: str) -> AdapterPublic:
    """A built-in adapter, with what a worker serving the model found in its file (version: the start of
    its SHA-256; ranks; size); those stay null until a worker has started."""
    found = builtin_adapter_description(conn, settings.model, name) or {}
    return AdapterPublic(
        name=name, builtin=True, source="builtin", description="URAE preset adapter",
        version=found.get("version"), rank=found.get("rank"), export_rank=found.get("export_rank"),
        size_bytes=found.get("size_bytes"),
    )


@router.get("", response_model=AdapterList)
def adapters_index(principal: ApiKeyDep, conn: RedisDep, settings: SettingsDep) -> AdapterList:
    """Built-in adapters and the caller's own (an admin key sees every registered one)."""
    registered = [AdapterPublic(**a) for a in list_adapters(conn) if principal.can_access(a.get("owner"))]
    return AdapterList(adapters=[_builtin(conn, settings, n) for n in BUILTIN_ADAPTERS] + registered)


@router.get("/{name}", response_model=AdapterPublic, responses=ERRORS)
def adapter_detail(name: AdapterName, principal: ApiKeyDep, conn: RedisDep, settings: SettingsDep) -> AdapterPublic:
    if name in BUILTIN_ADAPTERS:
        return _builtin(conn, settings, name)
    record = get_adapter(conn, name)
    if record is None or not principal.can_access(record.get("owner")):
        raise ApiError(404, f"adapter {name!r} not found")
    return AdapterPublic(**record)


@router.delete("/{name}", status_code=204, responses={**ERRORS, 409: {"model": ErrorBody}})
def adapter_delete(name: AdapterName, principal: ApiKeyDep, conn: RedisDep, storage: StorageDep) -> None:
    """Unregister an adapter and delete its file; queued jobs that name it will fail at start."""
    if name in BUILTIN_ADAPTERS:
        raise ApiError(409, f"{name!r} is a built-in adapter and cannot be deleted")
    record = get_adapter(conn, name)
    if record is None or not principal.can_access(record.get("owner")):
        raise ApiError(404, f"adapter {name!r} not found")
    removed = unregister_adapter(conn, name)
    if removed is None:
        raise ApiError(404, f"adapter {name!r} not found")
    storage.delete(f"adapters/{name}")
    charge(conn, removed.get("owner", ""), -int(removed.get("size_bytes", 0)))


@router.post(
    "",
    status_code=201,
    response_model=AdapterPublic,
    responses={**ERRORS, 202: {"model": JobPublic, "description": "still converting: follow the job"},
               409: {"model": ErrorBody}, 413: {"model": ErrorBody}, 429: {"model": ErrorBody}},
)
async def adapter_upload(
    file: Annotated[UploadFile, File(description="a .safetensors LoRA or URAE minor-component adapter")],
    name: Annotated[str, Form(pattern=ADAPTER_NAME_PATTERN)],
    request: Request,
    principal: ApiKeyDep,
    settings: SettingsDep,
    conn: RedisDep,
    records: RecordsDep,
    storage: StorageDep,
    description: Annotated[str, Form(max_length=500)] = "",
    replace: Annotated[bool, Form()] = False,
    base_adapter: Annotated[
        str | None,
        Form(
            pattern=ADAPTER_NAME_PATTERN,
            description="minor-component files only (required for them): the LoRA fused into the base before "
            f"the SVD split: urae-2k for URAE's official 4K file, {NO_BASE_ADAPTER!r} for a split of the plain base",
        ),
    ] = None,
) -> JSONResponse:
    """Upload an adapter. The header is checked here; a worker checks that it fits the base model and
    converts a minor-component file into the served form (a plain LoRA)."""
    accept = functools.partial(
        _accept_upload, file, name, request, principal, settings, conn, records, storage, description, replace,
        base_adapter,
    )
    # Upload checks share the upload threads (service.limits.UPLOAD_THREADS) with every upload route.
    record = await anyio.to_thread.run_sync(accept, limiter=request.app.state.upload_threads)
    job_id = record["id"]
    try:
        # Waiting for the worker holds no server thread: the event loop polls the job's status.
        await _wait_until_ended(request.app.state.aredis, job_id, settings.adapter_import_wait_s)
        return await run_in_threadpool(_import_answer, job_id, name, conn, records)
    except (redis.ConnectionError, redis.TimeoutError):
        # The upload is stored and its job queued: say so (follow the job), never 503 for work accepted.
        body = job_public(record).model_dump(mode="json")
        return JSONResponse(body, 202, headers={"Location": f"/jobs/{job_id}"})


async def _wait_until_ended(aredis: aioredis.Redis, job_id: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = await aredis.hget(job_key(job_id), "status")
        if status is None or status.decode() in TERMINAL_STATUSES:
            return
        await asyncio.sleep(_IMPORT_POLL_S)


def _accept_upload(
    file: UploadFile, name: str, request: Request, principal: Principal, settings: Settings, conn: redis.Redis,
    records: JobRecords, storage: Storage, description: str, replace: bool, base_adapter: str | None = None,
) -> dict[str, Any]:
    """Check, store and enqueue the upload (blocking I/O: run in the thread pool); the import job's
    record. When the job cannot be queued the stored file is removed: nothing is left behind."""
    if name in BUILTIN_ADAPTERS:
        raise ApiError(409, f"{name!r} is the name of a built-in adapter", field="name")
    if name == NO_BASE_ADAPTER:
        raise ApiError(422, f"{name!r} is reserved (base_adapter={NO_BASE_ADAPTER} means no base adapter)", field="name")
    if base_adapter not in (None, NO_BASE_ADAPTER):
        check_adapters_exist(conn, [base_adapter], principal, field="base_adapter")
    replaces = check_name_free(conn, principal, name, replace, "name")
    check_queue_depth(conn, ADAPTER_IMPORT_QUEUE, settings)
    check_queued_per_key(records, principal, settings)
    left = check_storage_quota(conn, principal, settings, declared_length(request), "file")
    limit = settings.max_adapter_bytes if left is None else min(settings.max_adapter_bytes, left)
    job_id = new_job_id()
    key = upload_object(job_id, ".safetensors")
    try:
        with spooled_upload(file.file, storage.staging_dir(), limit, "the adapter file") as tmp:
            summary = check_safetensors(tmp)
            _check_base_adapter(summary, base_adapter)
            storage.put_file(key, tmp)
    except UploadError as exc:
        too_large = "larger than the limit" in str(exc)
        if too_large and left is not None and limit < settings.max_adapter_bytes:
            raise quota_error(settings, left, None, "file") from None
        raise ApiError(413 if too_large else 422, str(exc), field="file") from None

    payload = AdapterImportPayload(
        job_id=job_id, name=name, upload=key, description=description, base_adapter=base_adapter, replaces=replaces
    )
    try:
        return records.create_and_enqueue(
            job_id, JobKind.ADAPTER_IMPORT, ADAPTER_IMPORT_QUEUE, payload.model_dump(), priority="high",
            owner=principal.key_id, timeout_s=settings.job_timeout_s, max_queued=settings.max_queued_jobs_per_key,
        )
    except BaseException:
        try:
            storage.delete(key)
        except (StorageUnavailable, OSError):
            log.warning("upload %s not removed after its job could not be queued", key)
        raise


def _check_base_adapter(summary: SafetensorsSummary, base_adapter: str | None) -> None:
    """A minor-component file is converted against the base it was split from: the caller must say which.

    Converted against the wrong weights (the official 4K file without the 2K LoRA it was split on top
    of) it would serve a different model without any error.
    """
    if summary.is_minor_components and base_adapter is None:
        raise ApiError(
            422,
            "this is a URAE minor-component adapter: send base_adapter, the LoRA fused into the base before its "
            f"SVD split (urae-2k for URAE's official 4K file, {NO_BASE_ADAPTER} for a split of the plain base model)",
            field="base_adapter",
        )
    if not summary.is_minor_components and base_adapter is not None:
        raise ApiError(
            422, "base_adapter is for URAE minor-component files only; this file is a plain LoRA", field="base_adapter"
        )


def _import_answer(job_id: str, name: str, conn: redis.Redis, records: JobRecords) -> JSONResponse:
    """201 with the adapter once imported, 422 when refused, else 202 with the job to follow."""
    record = records.get(job_id)
    if record["status"] == JobStatus.FINISHED:
        adapter = get_adapter(conn, name)
        if adapter is not None:
            return JSONResponse(AdapterPublic(**adapter).model_dump(mode="json"), 201, headers={"Location": f"/adapters/{name}"})
    if record["status"] in (JobStatus.FAILED, JobStatus.CANCELED):
        raise ApiError(422, record.get("error") or "the adapter was refused", field="file")
    body = job_public(record, records.queue_position(record)).model_dump(mode="json")
    return JSONResponse(body, 202, headers={"Location": f"/jobs/{job_id}"})
