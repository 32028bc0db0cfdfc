"""POST /finetune: a dataset (uploaded archive or a name on the server) and a recipe -> a training job."""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.to_thread
import redis
from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from jobstore.contract import (
    ADAPTER_NAME_PATTERN,
    BUILTIN_ADAPTERS,
    DATASET_NAME_PATTERN,
    FINETUNE_QUEUE,
    FinetunePayload,
    JobKind,
    dataset_prefix,
)
from jobstore.datasets import delete_dataset, get_dataset, register_dataset, use_dataset
from jobstore.jobs import JobRecords, new_job_id
from jobstore.settings import Settings
from jobstore.storage import ObjectExists, Storage, StorageUnavailable
from service.admission import (
    ApiError,
    check_adapters_exist,
    check_name_free,
    check_queue_depth,
    check_queued_per_key,
    check_storage_quota,
    declared_length,
    field_path,
    parse_json_field,
    quota_error,
)
from service.auth import Principal
from service.deps import ApiKeyDep, RecordsDep, RedisDep, SettingsDep, StorageDep
from service.json_bodies import BoundedJsonRoute
from service.routers.jobs import job_public
from service.schemas import ErrorBody, FinetuneRecipe, JobPublic
from service.uploads import ArchiveLimits, UploadError, extract_dataset, min_image_long_side, spooled_upload
from service.webhook_admission import check_webhook

router = APIRouter(route_class=BoundedJsonRoute, tags=["finetune"])
log = logging.getLogger("urae.service")


@router.post(
    "/finetune",
    status_code=202,
    response_model=JobPublic,
    responses={401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 409: {"model": ErrorBody},
               413: {"model": ErrorBody}, 422: {"model": ErrorBody}, 429: {"model": ErrorBody}},
)
async def submit_finetune(
    request: Request,
    response: Response,
    principal: ApiKeyDep,
    settings: SettingsDep,
    conn: RedisDep,
    records: RecordsDep,
    storage: StorageDep,
    adapter_name: Annotated[str, Form(pattern=ADAPTER_NAME_PATTERN, description="name to register the result under")],
    dataset: Annotated[UploadFile | None, File(description="zip or tar of images with .txt captions")] = None,
    dataset_name: Annotated[str | None, Form(pattern=DATASET_NAME_PATTERN,
                                             description="a dataset already on the server, or the name for the upload")] = None,
    recipe: Annotated[str, Form(description='training parameters as JSON, e.g. {"steps": 200, "rank": 16}')] = "{}",
    webhook: Annotated[str | None, Form(max_length=2000, description="http(s) URL that receives the job's events")] = None,
    webhook_events: Annotated[str | None, Form(
        max_length=200, description="comma-separated: started, progress, completed, failed, canceled "
                                    "(default: completed, failed, canceled)")] = None,
    replace: Annotated[bool, Form(description="replace an adapter of yours that has this name")] = False,
) -> JobPublic:
    """Queue a fine-tune. Progress reports step, loss and ETA; on success the adapter is registered.

    Like an upload, a fine-tune onto an existing adapter name is refused (409) unless ``replace=true``.
    """
    events = [e.strip() for e in webhook_events.split(",") if e.strip()] if webhook_events is not None else None
    checked = await run_in_threadpool(
        _check_request, conn, records, principal, settings, adapter_name, recipe, replace, webhook, events)
    job_id = new_job_id()
    uploaded = False
    if dataset is not None:
        name = dataset_name or f"{adapter_name}-{job_id[:8]}"
        # Spooling, extracting and storing share the upload threads with every upload route: a burst
        # of archives waits for them without holding a pool thread.
        await anyio.to_thread.run_sync(
            functools.partial(_store_dataset, request, conn, principal, settings, storage, dataset, name, checked.recipe),
            limiter=request.app.state.upload_threads,
        )
        uploaded = True
    elif dataset_name is not None:
        name = dataset_name
        await run_in_threadpool(_check_dataset_visible, conn, storage, principal, name)
    else:
        raise ApiError(422, "give a dataset archive or the name of a dataset on the server", field="dataset")
    record = await run_in_threadpool(_queue_job, conn, records, storage, principal, settings, job_id, adapter_name,
                                     name, checked, uploaded)
    response.headers["Location"] = f"/jobs/{job_id}"
    return job_public(record, records.queue_position(record))


@dataclass(frozen=True)
class _Checked:
    recipe: FinetuneRecipe
    replaces: str
    webhook: dict[str, Any] | None


def _check_request(
    conn: redis.Redis, records: JobRecords, principal: Principal, settings: Settings, adapter_name: str, recipe: str,
    replace: bool, webhook: str | None, events: list[str] | None,
) -> _Checked:
    """Everything decided before a byte of the dataset is extracted."""
    if adapter_name in BUILTIN_ADAPTERS:
        raise ApiError(409, f"{adapter_name!r} is the name of a built-in adapter", field="adapter_name")
    replaces = check_name_free(conn, principal, adapter_name, replace, "adapter_name")
    parsed = _parse_recipe(recipe)
    if parsed.base_adapter is not None:
        check_adapters_exist(conn, [parsed.base_adapter], principal, field="recipe.base_adapter")
    check_queue_depth(conn, FINETUNE_QUEUE, settings)
    webhook_target = check_webhook(settings, webhook, events)
    check_queued_per_key(records, principal, settings)
    return _Checked(parsed, replaces, webhook_target)


def _parse_recipe(recipe: str) -> FinetuneRecipe:
    """The recipe form field: a JSON object of training parameters; 422 naming the field otherwise."""
    value = parse_json_field(recipe, "recipe")
    if not isinstance(value, dict):
        raise ApiError(422, "recipe must be a JSON object", field="recipe")
    try:
        return FinetuneRecipe.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = field_path(first["loc"])
        reason = "is not a training parameter the API accepts" if first["type"] == "extra_forbidden" else first["msg"]
        where = f"recipe.{field}" if field else "recipe"
        raise ApiError(422, f"{where}: {reason}", field=where) from None


def _store_dataset(
    request: Request, conn: redis.Redis, principal: Principal, settings: Settings, storage: Storage,
    dataset: UploadFile, name: str, recipe: FinetuneRecipe,
) -> None:
    """Spool, check and store the uploaded archive as dataset ``name``, and register it."""
    if storage.tree_exists(dataset_prefix(name)):
        raise ApiError(409, f"dataset {name!r} already exists", field="dataset")
    left = check_storage_quota(conn, principal, settings, declared_length(request), "dataset")
    expand = settings.max_dataset_uncompressed_bytes
    limits = ArchiveLimits(settings.max_dataset_files, expand if left is None else min(expand, left),
                           min_image_long_side(recipe.recipe, recipe.resolution))
    # Spooled and checked on this host, then stored as a whole (visible once every file is in).
    staging = Path(tempfile.mkdtemp(dir=storage.staging_dir(), prefix=".tmp-"))
    dest = staging / name
    try:
        with spooled_upload(dataset.file, staging, settings.max_dataset_bytes, "the dataset upload") as tmp:
            images = extract_dataset(tmp, dest, limits)
        files = [entry.stat().st_size for entry in dest.iterdir() if entry.is_file()]
        storage.put_tree(dataset_prefix(name), dest)
    except ObjectExists:
        raise ApiError(409, f"dataset {name!r} already exists", field="dataset") from None
    except UploadError as exc:
        if "expand" in str(exc) and left is not None and limits.max_total_bytes < expand:
            raise quota_error(settings, left, None, "dataset") from None
        status = 409 if "already exists" in str(exc) else 413 if "larger than the limit" in str(exc) else 422
        raise ApiError(status, str(exc), field="dataset") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        register_dataset(conn, name, principal.key_id, sum(files), len(files), images)
    except BaseException:
        _forget_stored_dataset(conn, storage, name)
        raise


def _check_dataset_visible(conn: redis.Redis, storage: Storage, principal: Principal, name: str) -> None:
    record = get_dataset(conn, name)
    # A folder an operator put on the server without the API has no record: admin keys only.
    visible = principal.can_access(record.get("owner")) if record is not None else principal.admin
    if not visible or not storage.tree_exists(dataset_prefix(name)):
        raise ApiError(404, f"dataset {name!r} is not on the server", field="dataset_name")


def _queue_job(
    conn: redis.Redis, records: JobRecords, storage: Storage, principal: Principal, settings: Settings, job_id: str,
    adapter_name: str, dataset: str, checked: _Checked, uploaded: bool,
) -> dict[str, Any]:
    """Write and queue the job (with the dataset's use, in the same transaction). When that fails, a
    dataset uploaded by this request is removed: an error answer leaves nothing behind."""
    payload = FinetunePayload(
        job_id=job_id, adapter_name=adapter_name, dataset=dataset, recipe=checked.recipe.model_dump(exclude_none=True),
        replaces=checked.replaces,
    )
    try:
        return records.create_and_enqueue(
            job_id, JobKind.FINETUNE, FINETUNE_QUEUE, payload.model_dump(), owner=principal.key_id,
            timeout_s=settings.finetune_timeout_s, webhook=checked.webhook,
            max_queued=settings.max_queued_jobs_per_key,
            also=lambda pipe: use_dataset(conn, dataset, job_id, pipe),
        )
    except BaseException:
        if uploaded:
            _forget_stored_dataset(conn, storage, dataset)
        raise


def _forget_stored_dataset(conn: redis.Redis, storage: Storage, name: str) -> None:
    try:
        if delete_dataset(conn, storage, name) is None:
            storage.delete(dataset_prefix(name))
    except (redis.RedisError, StorageUnavailable, OSError):
        log.warning("dataset %r not removed after its fine-tune could not be queued", name)
