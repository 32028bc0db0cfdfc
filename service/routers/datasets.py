"""Uploaded training datasets: list, inspect and delete the caller's own.

A dataset arrives with POST /finetune (an archive) and stays under its name for later fine-tunes;
it is deleted by DELETE /datasets/{name}, or by the maintenance thread once no fine-tune has used
it for ``URAE_DATASET_TTL_S``. Its bytes count against the owner's storage quota until then.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel

from jobstore.contract import DATASET_NAME_PATTERN
from jobstore.datasets import active_jobs, delete_dataset, get_dataset, list_datasets
from service.admission import ApiError
from service.auth import Principal
from service.deps import ApiKeyDep, RedisDep, StorageDep
from service.json_bodies import BoundedJsonRoute
from service.schemas import ErrorBody

router = APIRouter(route_class=BoundedJsonRoute, prefix="/datasets", tags=["datasets"])

DatasetName = Annotated[str, Path(pattern=DATASET_NAME_PATTERN, description="lower-case letters, digits, - and _")]
ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody}}


class DatasetPublic(BaseModel):
    name: str
    size_bytes: int
    files: int
    images: int
    created_at: float
    # When a fine-tune was last queued with it; None: never used since the upload.
    last_used_at: float | None = None


class DatasetList(BaseModel):
    datasets: list[DatasetPublic]


def _visible(conn: RedisDep, name: str, principal: Principal) -> dict[str, Any]:
    record = get_dataset(conn, name)
    if record is None or not principal.can_access(record.get("owner")):
        raise ApiError(404, f"dataset {name!r} not found")
    return record


@router.get("", response_model=DatasetList)
def datasets_index(principal: ApiKeyDep, conn: RedisDep) -> DatasetList:
    """The caller's datasets (an admin key sees every one)."""
    return DatasetList(datasets=[DatasetPublic(**d) for d in list_datasets(conn) if principal.can_access(d.get("owner"))])


@router.get("/{name}", response_model=DatasetPublic, responses=ERRORS)
def dataset_detail(name: DatasetName, principal: ApiKeyDep, conn: RedisDep) -> DatasetPublic:
    return DatasetPublic(**_visible(conn, name, principal))


@router.delete("/{name}", status_code=204, responses={**ERRORS, 409: {"model": ErrorBody}})
def dataset_delete(name: DatasetName, principal: ApiKeyDep, conn: RedisDep, storage: StorageDep) -> None:
    """Delete a dataset and free its bytes; 409 while a queued or running fine-tune uses it."""
    _visible(conn, name, principal)
    busy = active_jobs(conn, name)
    if busy:
        raise ApiError(409, f"dataset {name!r} is used by fine-tune job(s) {', '.join(sorted(busy))}; "
                            "cancel them or wait until they end")
    if delete_dataset(conn, storage, name) is None:
        raise ApiError(404, f"dataset {name!r} not found")
