"""POST /generate: validate, admit, enqueue; 202 with the job."""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response

from jobstore.contract import (
    GENERATE_QUEUES,
    MAX_SEED,
    GeneratePayload,
    JobKind,
    generate_queue,
    idempotency_key,
)
from jobstore.jobs import JobNotFound, new_job_id
from service.admission import (
    ApiError,
    adapters_per_image,
    check_adapters_exist,
    check_capability,
    check_queue_depth,
    check_queued_per_key,
    check_storage_quota,
    generate_queue_lengths,
)
from service.deps import ApiKeyDep, RecordsDep, RedisDep, SettingsDep
from service.routers.jobs import job_public
from service.schemas import ErrorBody, GenerateRequest, JobPublic
from service.webhook_admission import check_webhook

router = APIRouter(tags=["generate"])

_IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,128}$")


@router.post(
    "/generate",
    status_code=202,
    response_model=JobPublic,
    responses={401: {"model": ErrorBody}, 409: {"model": ErrorBody}, 413: {"model": ErrorBody}, 422: {"model": ErrorBody},
               429: {"model": ErrorBody}, 503: {"model": ErrorBody}},
)
def submit_generation(
    body: GenerateRequest,
    request: Request,
    response: Response,
    principal: ApiKeyDep,
    settings: SettingsDep,
    conn: RedisDep,
    records: RecordsDep,
    idempotency: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JobPublic:
    """Queue a text-to-image job. Repeating a request with the same ``Idempotency-Key`` returns the same job."""
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
        fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest()[:16]
        existing = conn.get(claim)
        if existing is not None:
            return _replay(existing.decode() if isinstance(existing, bytes) else existing, fingerprint, records, response)

    lengths = generate_queue_lengths(conn)
    check_queue_depth(conn, queue, settings, lengths[queue])
    check_queued_per_key(records, principal, settings)
    # Images count against the key's storage quota: a key that is full makes no new ones.
    check_storage_quota(conn, principal, settings, None, None)
    job_id = new_job_id()
    if claim is not None and not conn.set(claim, f"{job_id}:{fingerprint}", nx=True, ex=settings.idempotency_ttl_s):
        # Another request with this key won the race a moment ago.
        winner = conn.get(claim)
        return _replay(winner.decode() if isinstance(winner, bytes) else str(winner), fingerprint, records, response)

    payload = GeneratePayload(
        job_id=job_id,
        prompt=body.prompt,
        preset=body.resolved_preset(),
        aspect_ratio=body.aspect_ratio,
        width=body.width,
        height=body.height,
        steps=body.steps,
        guidance=body.guidance,
        seed=body.seed if body.seed is not None else secrets.randbelow(MAX_SEED),
        num_images=body.num_images,
        adapters=body.adapters,
        adapter_versions=versions,
        output_format=body.output_format,
        preview_every=body.preview_every,
        tier=body.tier,
    )
    try:
        record = records.create_and_enqueue(
            job_id, JobKind.GENERATE, queue, payload.model_dump(), priority=body.priority,
            owner=owner, timeout_s=settings.job_timeout_s, webhook=webhook,
        )
    except Exception:
        if claim is not None:
            conn.delete(claim)
        raise
    response.headers["Location"] = f"/jobs/{job_id}"
    # Jobs in higher-priority queues run first: they count as ahead of this one.
    ahead = sum(lengths[q] for q in GENERATE_QUEUES[: GENERATE_QUEUES.index(queue)])
    job = job_public(record, ahead + record["queue_length"] - 1)
    job.warnings = prompt_length_estimate(body.prompt)
    return job


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
