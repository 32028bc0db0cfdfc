"""A job's state, its live events (SSE), its cancellation and its images."""

from __future__ import annotations

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
    job_key,
)
from jobstore.jobs import JobNotFound, JobRecords
from jobstore.storage import ObjectNotFound, StorageUnavailable
from jobstore.webhook_targets import redact_url
from service.admission import ApiError
from service.auth import Principal
from service.deps import ApiKeyDep, RecordsDep, SettingsDep, StorageDep
from service.event_streams import EventHub, EventStreamResponse
from service.json_bodies import BoundedJsonRoute
from service.schemas import ErrorBody, JobPublic, Links, Progress, WebhookTargetPublic

router = APIRouter(route_class=BoundedJsonRoute, prefix="/jobs", tags=["jobs"])

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
        # Credentials in the URL stay on the server (user info, query values): never in an answer.
        webhook=WebhookTargetPublic(url=redact_url(record["webhook"]["url"]), events=record["webhook"]["events"])
        if record.get("webhook") else None,
        webhooks=record.get("webhooks") or [],
        warnings=list((result or {}).get("warnings") or []),
    )


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
def cancel_job(job_id: JobId, principal: ApiKeyDep, records: RecordsDep, storage: StorageDep) -> JSONResponse:
    """Cancel: a queued job never runs (200, canceled); a running one stops at its next step (202)."""
    record = _get(records, job_id, principal)
    before = record["status"]
    if before in TERMINAL_STATUSES:
        raise ApiError(409, f"job {job_id} already ended ({before})")
    status = records.request_cancel(job_id)
    if status == JobStatus.CANCELED and before == JobStatus.QUEUED:
        # No worker will take it: its uploaded input image goes now (else the retention sweep's).
        upload = ((record.get("payload") or {}).get("image") or {}).get("key")
        if upload:
            try:
                storage.delete(upload)
            except (StorageUnavailable, OSError):
                pass  # the retention sweep removes it
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
    responses={**NOT_FOUND, 400: {"model": ErrorBody}, 429: {"model": ErrorBody}, 503: {"model": ErrorBody},
               200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}},
)
async def job_events(job_id: JobId, request: Request, principal: ApiKeyDep, settings: SettingsDep) -> StreamingResponse:
    """Server-Sent Events: every status and progress change from the job's start, until it ends.

    Events are named ``status`` (data: {"status": ...}) and ``progress`` (data: {"stage", "step",
    "total", ...}) and ``preview`` (data: {"step", "total", "index", "width", "height", "image": a JPEG
    data URL}; only the latest preview is kept, so a replay sends it once); the stream closes after the
    terminal status event. When the API shuts down, an open
    stream ends with ``event: reconnect``: reconnect (with Last-Event-ID) to continue where it stopped.
    A key may hold ``URAE_MAX_EVENT_STREAMS_PER_KEY`` streams open at once (429 past it).
    """
    pool: aioredis.Redis = request.app.state.aredis
    hub: EventHub = request.app.state.event_hub
    owner = await pool.hget(job_key(job_id), "owner")
    # Absent, or another key's job: the same answer.
    if owner is None or not principal.can_access(owner.decode()):
        raise ApiError(404, f"job {job_id} not found")
    # A reconnecting EventSource sends the id of the last event it saw: continue after it.
    resume_from = request.headers.get("last-event-id", "").strip() or "0"
    await hub.check_resume_id(pool, job_id, resume_from)
    release = hub.acquire(principal.key_id)
    return EventStreamResponse(
        hub.stream(pool, job_id, request, settings.sse_keepalive_s, resume_from), release,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
