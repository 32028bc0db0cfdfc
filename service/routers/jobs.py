"""A job's state, its live events (SSE), its cancellation and its images."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from jobstore.contract import (
    CONTENT_TYPES,
    JOB_ID_PATTERN,
    MAX_IMAGES,
    TERMINAL_STATUSES,
    JobStatus,
    job_events_key,
    job_key,
    job_preview_key,
)
from jobstore.jobs import JobNotFound, JobRecords
from jobstore.storage import ObjectNotFound
from service.admission import ApiError
from service.auth import Principal
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
        webhook=record.get("webhook"),
        webhooks=record.get("webhooks") or [],
        warnings=list((result or {}).get("warnings") or []),
    )


async def _latest_preview(aredis: aioredis.Redis, job_id: str, sent_step: int) -> dict[str, Any] | None:
    """The job's latest preview as an event ({type, step, total, index, width, height, image}), or None
    when it is no newer than the one already sent."""
    raw = await aredis.get(job_preview_key(job_id))
    if raw is None:
        return None
    preview = json.loads(raw)
    if int(preview.get("step", -1)) <= sent_step:
        return None
    return {"type": "preview", **preview}


def _get(records: JobRecords, job_id: str, principal: Principal) -> dict[str, Any]:
    """The job's record; 404 when absent or another key's (the two answers are the same)."""
    try:
        record = records.get(job_id)
    except JobNotFound:
        record = None
    if record is None or not principal.can_access(record.get("owner")):
        raise ApiError(404, f"job {job_id} not found")
    return record


@router.get("/{job_id}", response_model=JobPublic, responses=NOT_FOUND)
def get_job(job_id: JobId, principal: ApiKeyDep, records: RecordsDep) -> JobPublic:
    """Status, progress, queue position, per-stage timings, result links and a readable error."""
    record = _get(records, job_id, principal)
    return job_public(record, records.queue_position(record))


@router.delete("/{job_id}", response_model=JobPublic, responses={**NOT_FOUND, 409: {"model": ErrorBody}})
def cancel_job(job_id: JobId, principal: ApiKeyDep, records: RecordsDep) -> JSONResponse:
    """Cancel: a queued job never runs (200, canceled); a running one stops at its next step (202)."""
    before = _get(records, job_id, principal)["status"]
    if before in TERMINAL_STATUSES:
        raise ApiError(409, f"job {job_id} already ended ({before})")
    status = records.request_cancel(job_id)
    body = job_public(records.get(job_id)).model_dump(mode="json")
    return JSONResponse(body, status_code=200 if status == JobStatus.CANCELED else 202)


@router.get(
    "/{job_id}/images/{index}",
    response_class=StreamingResponse,
    responses={**NOT_FOUND, 409: {"model": ErrorBody}, 503: {"model": ErrorBody},
               200: {"content": {t: {} for t in CONTENT_TYPES.values()}},
               307: {"description": "with URAE_S3_PRESIGNED_DOWNLOADS: a short-lived link to the object store"}},
)
def get_image(
    job_id: JobId, index: Annotated[int, Path(ge=0, lt=MAX_IMAGES)], principal: ApiKeyDep, records: RecordsDep,
    storage: StorageDep,
) -> Response:
    """One output image, with its content type (generation metadata embedded in the file): streamed
    from storage, or a redirect to a short-lived presigned URL when the deployment enables them."""
    record = _get(records, job_id, principal)
    if record["status"] != JobStatus.FINISHED:
        raise ApiError(409, f"job {job_id} has no images: it is {record['status']}")
    images = (record.get("result") or {}).get("images", [])
    if index >= len(images):
        raise ApiError(404, f"job {job_id} has {len(images)} image(s); there is no image {index}")
    image = images[index]
    key = image["key"]
    try:
        size = storage.stat(key).size
    except ObjectNotFound:
        raise ApiError(404, f"image {index} of job {job_id} is no longer stored") from None
    url = storage.download_url(key)
    if url is not None:
        return RedirectResponse(url, 307, headers={"Cache-Control": "no-store"})
    name = key.rsplit("/", 1)[-1]
    return StreamingResponse(
        storage.iter_bytes(key), media_type=image["content_type"],
        headers={"Content-Length": str(size), "Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.get(
    "/{job_id}/events",
    responses={**NOT_FOUND, 400: {"model": ErrorBody},
               200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}},
)
async def job_events(job_id: JobId, request: Request, principal: ApiKeyDep, settings: SettingsDep) -> StreamingResponse:
    """Server-Sent Events: every status and progress change from the job's start, until it ends.

    Events are named ``status`` (data: {"status": ...}) and ``progress`` (data: {"stage", "step",
    "total", ...}) and ``preview`` (data: {"step", "total", "index", "width", "height", "image": a JPEG
    data URL}; only the latest preview is kept, so a replay sends it once); the stream closes after the
    terminal status event. When the API shuts down, an open
    stream ends with ``event: reconnect``: reconnect (with Last-Event-ID) to continue where it stopped.
    """
    aredis: aioredis.Redis = request.app.state.aredis
    owner = await aredis.hget(job_key(job_id), "owner")
    # Absent, or another key's job: the same answer.
    if owner is None or not principal.can_access(owner.decode()):
        raise ApiError(404, f"job {job_id} not found")
    # A reconnecting EventSource sends the id of the last event it saw: continue after it.
    resume_from = request.headers.get("last-event-id", "").strip() or "0"
    if resume_from != "0" and not _valid_stream_id(resume_from):
        raise ApiError(400, "Last-Event-ID must be the id of an event of this stream, like 1700000000000-0",
                       field="Last-Event-ID")
    shutdown: asyncio.Event = getattr(request.app.state, "shutting_down", None) or asyncio.Event()
    return StreamingResponse(
        _event_stream(aredis, job_id, request, settings.sse_keepalive_s, resume_from, shutdown),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _valid_stream_id(value: str) -> bool:
    """A Redis stream id: two unsigned 64-bit integers (Redis answers an error for anything else)."""
    if not _STREAM_ID_RE.match(value):
        return False
    return all(int(part) < 2**64 for part in value.split("-"))


# How long one read of the event stream blocks: the bound on noticing a shutdown.
_READ_BLOCK_S = 0.5
RECONNECT_EVENT = (
    "event: reconnect\nretry: 1000\n"
    'data: {"detail": "the server is shutting down; reconnect with Last-Event-ID to continue"}\n\n'
)


async def _job_ended(aredis: aioredis.Redis, job_id: str) -> bool:
    status = await aredis.hget(job_key(job_id), "status")
    return status is None or status.decode() in TERMINAL_STATUSES


STORE_UNAVAILABLE_EVENT = 'event: error\ndata: {"detail": "event store unavailable"}\n\n'


async def _event_stream(
    aredis: aioredis.Redis, job_id: str, request: Request, keepalive_s: float, last_id: str,
    shutdown: asyncio.Event,
) -> AsyncIterator[str]:
    """The job's events; losing Redis at any point ends the stream with an error event, never a cut
    connection (the client reconnects with Last-Event-ID once the store is back)."""
    try:
        async for chunk in _events(aredis, job_id, request, keepalive_s, last_id, shutdown):
            yield chunk
    except (aioredis.ConnectionError, aioredis.TimeoutError):
        yield STORE_UNAVAILABLE_EVENT


async def _events(
    aredis: aioredis.Redis, job_id: str, request: Request, keepalive_s: float, last_id: str,
    shutdown: asyncio.Event,
) -> AsyncIterator[str]:
    key = job_events_key(job_id)
    preview_sent = -1
    # A finished job's events are all written: read what is left without waiting, then stop.
    ended = await _job_ended(aredis, job_id)
    next_keepalive = asyncio.get_running_loop().time() + keepalive_s
    while True:
        if shutdown.is_set():
            yield RECONNECT_EVENT
            return
        block = None if ended else int(min(_READ_BLOCK_S, keepalive_s) * 1000)
        batch: Any = await aredis.xread({key: last_id}, count=200, block=block)
        if not batch:
            if ended:
                return
            if await request.is_disconnected():
                return
            ended = await _job_ended(aredis, job_id)
            now = asyncio.get_running_loop().time()
            if now >= next_keepalive:
                next_keepalive = now + keepalive_s
                yield ": keep-alive\n\n"
            continue
        for entry_id, fields in batch[0][1]:
            last_id = entry_id
            data = json.loads(fields[b"data"])
            if data.get("type") == "preview":
                # The stream holds only a marker; the image is the latest one kept (so a replay sends
                # the newest preview once, never a backlog of them).
                data = await _latest_preview(aredis, job_id, preview_sent)
                if data is None:
                    continue
                preview_sent = int(data["step"])
            yield f"id: {entry_id.decode()}\nevent: {data.get('type', 'status')}\ndata: {json.dumps(data)}\n\n"
            if data.get("type") == "status" and data.get("status") in TERMINAL_STATUSES:
                return
        await asyncio.sleep(0)
