"""POST /generate and POST /jobs/{id}/refine: validate, admit, store the input image, enqueue; 202 with the job."""

from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Header, Request, Response
from pydantic import ValidationError

from jobstore.contract import (
    BUILTIN_ADAPTERS,
    GENERATE_QUEUES,
    MAX_SEED,
    GeneratePayload,
    InputImage,
    JobKind,
    JobStatus,
    generate_queue,
    idempotency_key,
    input_upload_object,
)
from jobstore.jobs import JobNotFound, JobRecords, new_job_id
from jobstore.settings import Settings
from jobstore.storage import Storage, StorageUnavailable
from service.admission import (
    ApiError,
    adapters_per_image,
    check_adapters_exist,
    check_capability,
    check_queue_depth,
    check_queued_per_key,
    check_storage_quota,
    field_path,
    generate_queue_lengths,
)
from service.auth import Principal
from service.deps import ApiKeyDep, RecordsDep, RedisDep, SettingsDep, StorageDep
from service.input_images import InputImageFile, parse_data_url
from service.json_bodies import BoundedJsonRoute
from service.routers.jobs import JobId, job_public
from service.schemas import ErrorBody, GenerateRequest, ImageRef, JobPublic, RefineRequest
from service.webhook_admission import check_webhook

router = APIRouter(route_class=BoundedJsonRoute, tags=["generate"])
log = logging.getLogger("urae.service")

_IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,128}$")


RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 413: {"model": ErrorBody},
    422: {"model": ErrorBody}, 429: {"model": ErrorBody}, 503: {"model": ErrorBody},
}


@router.post("/generate", status_code=202, response_model=JobPublic, responses=RESPONSES)
def submit_generation(
    body: GenerateRequest,
    request: Request,
    response: Response,
    principal: ApiKeyDep,
    settings: SettingsDep,
    conn: RedisDep,
    records: RecordsDep,
    storage: StorageDep,
    idempotency: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JobPublic:
    """Queue a text-to-image job, or with ``image`` an image-to-image one. Repeating a request with the
    same ``Idempotency-Key`` returns the same job."""
    seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED)
    return _submit(body, seed, request, response, principal, settings, conn, records, storage, idempotency)


@router.post("/jobs/{job_id}/refine", status_code=202, response_model=JobPublic, responses=RESPONSES)
def refine_job(
    job_id: JobId,
    body: RefineRequest,
    request: Request,
    response: Response,
    principal: ApiKeyDep,
    settings: SettingsDep,
    conn: RedisDep,
    records: RecordsDep,
    storage: StorageDep,
    idempotency: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JobPublic:
    """Make image ``index`` of a finished generation again at a target size: its prompt, its seed, its
    user adapters, image to image from it. With ``preset`` the size keeps the draft's aspect ratio.
    Answers like POST /generate."""
    record = finished_generation(records, principal, job_id, job_field=None)
    draft = GeneratePayload.model_validate(record["payload"])
    image = source_image(record, body.index, "index")
    if body.preset is not None:
        size: dict[str, Any] = refined_size(draft, body.preset)
    else:
        size = {"width": body.width, "height": body.height}
    try:
        generation = GenerateRequest.model_validate(dict(
            prompt=draft.prompt, **size, seed=int(image["seed"]),
            # The target preset brings its own URAE adapter; the draft's built-in ones belong to its size.
            adapters=[a for a in draft.adapters if a.name not in BUILTIN_ADAPTERS],
            output_format=body.output_format or draft.output_format, priority=body.priority,
            tier=body.tier or draft.tier, preview_every=body.preview_every, webhook=body.webhook,
            webhook_events=body.webhook_events, image=ImageRef(job=job_id, index=body.index), strength=body.strength,
        ), context={"any_aspect_ratio": True})
    except ValidationError as exc:
        first = exc.errors()[0]
        reason = str(first["msg"]).removeprefix("Value error, ")
        field = field_path(first["loc"]) or ("preset" if body.preset is not None else "width")
        raise ApiError(422, f"the refined request is not valid: {field}: {reason}", field=field) from None
    return _submit(generation, generation.seed or 0, request, response, principal, settings, conn, records, storage,
                   idempotency)


def refined_size(draft: GeneratePayload, preset: str) -> dict[str, Any]:
    """The draft's framing at ``preset``: its named aspect ratio, or its own width:height (in lowest
    terms). The worker sizes it at the served model's own scale of that preset (FLUX.1's 2K is 2048 px,
    mini's 256 px), as for any preset request."""
    if draft.width is None or draft.height is None:
        return {"preset": preset, "aspect_ratio": draft.aspect_ratio}
    common = math.gcd(draft.width, draft.height)
    return {"preset": preset, "aspect_ratio": f"{draft.width // common}:{draft.height // common}"}


def finished_generation(records: JobRecords, principal: Principal, job_id: str, job_field: str | None) -> dict[str, Any]:
    """The record of one of the caller's finished generation jobs: 404 when absent or another key's
    (the same answer), 409 when not finished or not a generation."""
    try:
        record = records.get(job_id)
    except JobNotFound:
        record = None
    if record is None or not principal.can_access(record.get("owner")):
        raise ApiError(404, f"job {job_id} not found", field=job_field)
    if record["kind"] != JobKind.GENERATE:
        raise ApiError(409, f"job {job_id} is a {record['kind']} job, not a generation: it has no images",
                       field=job_field)
    if record["status"] != JobStatus.FINISHED:
        raise ApiError(409, f"job {job_id} has no images: it is {record['status']}", field=job_field)
    return record


def source_image(record: dict[str, Any], index: int, field: str) -> dict[str, Any]:
    """Image ``index`` of a finished generation's result; 422 naming ``field`` when it has no such image."""
    images = (record.get("result") or {}).get("images", [])
    if index >= len(images):
        raise ApiError(422, f"{field}: job {record['id']} has {len(images)} image(s); there is no image {index}",
                       field=field)
    return dict(images[index])


def _submit(
    body: GenerateRequest, seed: int, request: Request, response: Response, principal: Principal,
    settings: Settings, conn: redis.Redis, records: JobRecords, storage: Storage, idempotency: str | None,
) -> JobPublic:
    """Admit, store the input image, enqueue: the one path of POST /generate and POST /jobs/{id}/refine."""
    owner = principal.key_id
    width, height = body.size()
    versions = check_adapters_exist(conn, [a.name for a in body.adapters], principal)
    check_capability(conn, settings, width, height, request.app.state.workers, tier=body.tier,
                     adapters=adapters_per_image(body.resolved_preset(), [a.name for a in body.adapters]))
    webhook = check_webhook(settings, body.webhook, body.webhook_events)
    queue = generate_queue(body.priority)

    claim: str | None = None
    if idempotency is not None:
        if not _IDEMPOTENCY_KEY_RE.match(idempotency):
            raise ApiError(422, "Idempotency-Key must be 1..128 printable ASCII characters", field="Idempotency-Key")
        claim = idempotency_key(owner, hashlib.sha256(idempotency.encode()).hexdigest()[:32])
        # The body's fingerprint covers the input image (its data URL, or the job and index it names).
        fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest()[:16]
        existing = conn.get(claim)
        if existing is not None:
            return _replay(existing.decode() if isinstance(existing, bytes) else existing, fingerprint, records, response)

    lengths = generate_queue_lengths(conn)
    check_queue_depth(conn, queue, settings, lengths[queue])
    check_queued_per_key(records, principal, settings)
    # Images count against the key's storage quota: a key that is full makes no new ones.
    check_storage_quota(conn, principal, settings, None, None)
    # The input image is checked before anything is stored or queued.
    upload: InputImageFile | None = None
    source: InputImage | None = None
    if isinstance(body.image, str):
        upload = parse_data_url(body.image, settings.max_input_image_bytes)
    elif isinstance(body.image, ImageRef):
        referenced = finished_generation(records, principal, body.image.job, job_field="image.job")
        source_image(referenced, body.image.index, "image.index")
        source = InputImage(job=body.image.job, index=body.image.index)
    job_id = new_job_id()
    if claim is not None and not conn.set(claim, f"{job_id}:{fingerprint}", nx=True, ex=settings.idempotency_ttl_s):
        # Another request with this key won the race a moment ago.
        winner = conn.get(claim)
        return _replay(winner.decode() if isinstance(winner, bytes) else str(winner), fingerprint, records, response)

    stored: str | None = None
    try:
        if upload is not None:
            # Stored before the job is queued (the worker reads it); owned by the job from then on.
            stored = input_upload_object(job_id, upload.fmt)
            storage.put(stored, upload.data)
            source = InputImage(key=stored)
        payload = GeneratePayload(
            job_id=job_id,
            prompt=body.prompt,
            preset=body.resolved_preset(),
            aspect_ratio=body.aspect_ratio,
            width=body.width,
            height=body.height,
            steps=body.steps,
            guidance=body.guidance,
            seed=seed,
            num_images=body.num_images,
            adapters=body.adapters,
            adapter_versions=versions,
            output_format=body.output_format,
            preview_every=body.preview_every,
            tier=body.tier,
            image=source,
            strength=body.input_strength(),
        )
        record = records.create_and_enqueue(
            job_id, JobKind.GENERATE, queue, payload.model_dump(), priority=body.priority,
            owner=owner, timeout_s=settings.job_timeout_s, webhook=webhook,
            max_queued=settings.max_queued_jobs_per_key,
        )
    except BaseException:
        if claim is not None:
            conn.delete(claim)
        if stored is not None:
            _delete_quietly(storage, stored)
        raise
    response.headers["Location"] = f"/jobs/{job_id}"
    # Jobs in higher-priority queues run first: they count as ahead of this one.
    ahead = sum(lengths[q] for q in GENERATE_QUEUES[: GENERATE_QUEUES.index(queue)])
    job = job_public(record, ahead + record["queue_length"] - 1)
    job.warnings = prompt_length_estimate(body.prompt)
    return job


def _delete_quietly(storage: Storage, key: str) -> None:
    try:
        storage.delete(key)
    except (StorageUnavailable, OSError):
        # The retention sweep removes it later (its job never existed).
        log.warning("input image %s not removed after its job could not be queued", key)


# CLIP reads 77 tokens (start and end included); every word is at least one token.
CLIP_TOKENS = 77


def prompt_length_estimate(prompt: str) -> list[str]:
    """The API's cheap estimate (it has no tokenizer): more words than CLIP has tokens is certainly cut.
    The finished job's ``warnings`` are exact, counted by the worker with the model's tokenizers."""
    words = len(prompt.split())
    if words <= CLIP_TOKENS - 2:
        return []
    return [f"the prompt has {words} words: more than CLIP's {CLIP_TOKENS} tokens, so CLIP will not read its end; "
            "the finished job's warnings say exactly what each text encoder cut"]


def _replay(value: str, fingerprint: str, records: RecordsDep, response: Response) -> JobPublic:
    job_id, _, previous = value.partition(":")
    if previous != fingerprint:
        raise ApiError(422, "this Idempotency-Key was used with a different request", field="Idempotency-Key")
    try:
        record = records.get(job_id)
    except JobNotFound:
        # The key outlived the job's record (URAE_RESULT_TTL_S < URAE_IDEMPOTENCY_TTL_S): the job ran
        # and is forgotten. Running it again silently could duplicate work the client already has.
        raise ApiError(
            409,
            f"this Idempotency-Key was used for job {job_id}, whose record has expired; "
            "send the request with a new Idempotency-Key to run it again",
            field="Idempotency-Key",
        ) from None
    response.headers["Location"] = f"/jobs/{job_id}"
    return job_public(record, records.queue_position(record))
