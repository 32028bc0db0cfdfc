"""FastAPI dependencies: the settings, Redis, storage and the authenticated caller of a request.

The caller was authenticated by ``service.auth.AuthMiddleware`` before the body was read; the
dependency only picks the principal up from the ASGI scope.

They do no I/O, so they are ``async``: FastAPI then runs them inline instead of sending each one to
the thread pool (several thread hops per request otherwise).
"""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import Depends, Header, HTTPException, Request

from jobstore.jobs import JobRecords
from jobstore.settings import Settings
from jobstore.storage import Storage
from service.auth import PRINCIPAL_SCOPE_KEY, Principal, Unauthorized, authenticate


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis  # type: ignore[no-any-return]


async def get_records(request: Request) -> JobRecords:
    return request.app.state.records  # type: ignore[no-any-return]


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
RecordsDep = Annotated[JobRecords, Depends(get_records)]
StorageDep = Annotated[Storage, Depends(get_storage)]


async def require_api_key(
    request: Request,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    """The caller the middleware authenticated (or, for an app without it, authenticate here)."""
    principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if isinstance(principal, Principal):
        return principal
    try:
        return authenticate(settings, authorization)
    except Unauthorized as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None


ApiKeyDep = Annotated[Principal, Depends(require_api_key)]
