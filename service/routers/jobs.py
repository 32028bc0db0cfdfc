"""A job's state, its live events (SSE), its cancellation and its images."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Path, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from jobstore.contract import (
    CONTENT_TYPES,
    JOB_ID_PATTERN,
    MAX_IMAGES,
    TERMINAL_STATUSES,
    JobStatus,
    job_events_key,
    job_key,
)
from jobstore.jobs import JobNotFound, JobRecords
from service.admission import ApiError
from service.deps import ApiKeyDep, RecordsDep, SettingsDep, StorageDep
from service.schemas import ErrorBody, JobPublic, Links, Progress

router = APIRouter(prefix="/jobs", tags=["jobs"])
_STREAM_ID_RE = re.compile(r"^\d{1,20}-\d{1,20}$")

JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="32 lower-case hex digits")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody}, 401: {"model": ErrorBody}, 422: {"model": ErrorBody}}


def job_public(record: dict[str, Any], position: int | None = None) -> JobPublic:
    """The client's view of a job record."""
    job_id = record["id"]
    result = record.get("result")
    images = [f"/jobs/{job_id}/images/{i}" for i in range(len(result.get("images", [])))] if result else []
    progress = record.get("progress")
    return JobPublic(
        id=job_id,
        kind=record["kind"],
        status=record["status"],
        priority=record.get("priority"),
        queue_position=position,
        progress=Progress(**progress) if progress else None,
        timings=record.get("timings") or {},
        links=Links(self=f"/jobs/{job_id}", events=f"/jobs/{job_id}/events", images=images),
        error=record.get("error") or None,
        result=result,
        created_at=record["created_at"],
        started_at=record.get("started_at"),
        ended_at=record.get("ended_at"),
    )


def _get(records: JobRecords, job_id: str) -> dict[str, Any]:
    try:
        return records.get(job_id)
    except JobNotFound:
        raise ApiError(404, f"job {job_id} not found") from None


@router.get("/{job_id}", response_model=JobPublic, responses=NOT_FOUND)
def get_job(job_id: JobId, _: ApiKeyDep, records: RecordsDep) -> JobPublic:
    """Status, progress, queue position, per-stage timings, result links and a readable error."""
    record = _get(records, job_id)
    return job_public(record, records.queue_position(record))


@router.delete("/{job_id}", response_model=JobPublic, responses={**NOT_FOUND, 409: {"model": ErrorBody}})
def cancel_job(job_id: JobId, _: ApiKeyDep, records: RecordsDep) -> JSONResponse:
    """Cancel: a queued job never runs (200, canceled); a running one stops at its next step (202)."""
    before = _get(records, job_id)["status"]
    if before in TERMINAL_STATUSES:
        raise ApiError(409, f"job {job_id} already ended ({before})")
    status = records.request_cancel(job_id)
    body = job_public(records.get(job_id)).model_dump(mode="json")
    return JSONResponse(body, status_code=200 if status == JobStatus.CANCELED else 202)


@router.get(
    "/{job_id}/images/{index}",
    response_class=FileResponse,
    responses={**NOT_FOUND, 409: {"model": ErrorBody}, 200: {"content": {t: {} for t in CONTENT_TYPES.values()}}},
)
def get_image(
    job_id: JobId, index: Annotated[int, Path(ge=0, lt=MAX_IMAGES)], _: ApiKeyDep, records: RecordsDep,
    storage: StorageDep,
) -> FileResponse:
    """One output image, with its content type (generation metadata embedded in the file)."""
    record = _get(records, job_id)
    if record["status"] != JobStatus.FINISHED:
        raise ApiError(409, f"job {job_id} has no images: it is {record['status']}")
    images = (record.get("result") or {}).get("images", [])
    if index >= len(images):
        raise ApiError(404, f"job {job_id} has {len(images)} image(s); there is no image {index}")
    image = images[index]
    path = storage.path(image["key"])
    if not path.is_file():
        raise ApiError(404, f"image {index} of job {job_id} is no longer stored")
    return FileResponse(path, media_type=image["content_type"], filename=path.name)


@router.get(
    "/{job_id}/events",
    responses={**NOT_FOUND, 200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}},
)
async def job_events(job_id: JobId, request: Request, _: ApiKeyDep, settings: SettingsDep) -> StreamingResponse:
    """Server-Sent Events: every status and progress change from the job's start, until it ends.

    Events are named ``status`` (data: {"status": ...}) and ``progress`` (data: {"stage", "step",
    "total", ...}); the stream closes after the terminal status event.
    """
    aredis: aioredis.Redis = request.app.state.aredis
    if not await aredis.exists(job_key(job_id)):
        raise ApiError(404, f"job {job_id} not found")
    # A reconnecting EventSource sends the id of the last event it saw: continue after it.
    resume_from = request.headers.get("last-event-id", "0")
    if not _STREAM_ID_RE.match(resume_from):
        resume_from = "0"
    return StreamingResponse(
        _event_stream(aredis, job_id, request, settings.sse_keepalive_s, resume_from),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _event_stream(
    aredis: aioredis.Redis, job_id: str, request: Request, keepalive_s: float, last_id: str
) -> AsyncIterator[str]:
    key = job_events_key(job_id)
    while True:
        try:
            batch: Any = await aredis.xread({key: last_id}, count=200, block=int(keepalive_s * 1000))
        except (aioredis.ConnectionError, aioredis.TimeoutError):
            yield "event: error\ndata: {\"detail\": \"event store unavailable\"}\n\n"
            return
        if not batch:
            if await request.is_disconnected():
                return
            yield ": keep-alive\n\n"
            if not await aredis.exists(key):
                return
            continue
        for entry_id, fields in batch[0][1]:
            last_id = entry_id
            data = json.loads(fields[b"data"])
            yield f"id: {entry_id.decode()}\nevent: {data.get('type', 'status')}\ndata: {json.dumps(data)}\n\n"
            if data.get("type") == "status" and data.get("status") in TERMINAL_STATUSES:
                return
        await asyncio.sleep(0)
