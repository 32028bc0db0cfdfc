"""API keys and tenants: who is calling, decided from the request headers before any body is read.

A Bearer token is hashed (SHA-256) and compared in constant time against every configured digest.
The caller becomes a :class:`Principal`: a short stable key id (derived from the key's digest, so the
plain key is never stored) that owns the jobs, datasets and adapters it creates, and whether it is an
admin key (sees and manages everything). :class:`AuthMiddleware` does this for every protected
route as plain ASGI, so an unauthenticated request is answered 401 before the application (or
Starlette's form parser) reads or spools a single byte of its body.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any

from jobstore.settings import Settings, hash_api_key

OPEN_ACCESS_OWNER = "open"
# Where the middleware leaves the authenticated caller for the routers (an ASGI scope key).
PRINCIPAL_SCOPE_KEY = "urae.principal"
# Served without a key: liveness, the playground's static files and the API description.
PUBLIC_PATHS = frozenset({"/health", "/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PUBLIC_PREFIXES = ("/playground/",)


class Unauthorized(Exception):
    """Missing or wrong API key."""


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: ``key_id`` owns what it creates; an admin sees everything."""

    key_id: str
    admin: bool = False

    def can_access(self, owner: str | None) -> bool:
        """Whether a resource owned by ``owner`` is visible to (and manageable by) this caller."""
        return self.admin or (owner or "") == self.key_id


def key_id_of(key_hash: str) -> str:
    """The short, stable id of a key (from its SHA-256 digest): the owner recorded on resources."""
    return key_hash[:16]


def authenticate(settings: Settings, authorization: str | None) -> Principal:
    """Check an ``Authorization`` header; returns the caller.

    Every configured digest is compared, whatever matches first, so the time taken does not tell
    which key (or how much of one) was right. In the open development mode everything belongs to
    one anonymous principal.
    """
    if settings.open_access:
        return Principal(OPEN_ACCESS_OWNER, admin=True)
    if not authorization:
        raise Unauthorized("missing Authorization header: send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    presented = hash_api_key(token.strip())
    matched = False
    for known in settings.key_hashes:
        matched |= hmac.compare_digest(presented, known)
    admin = False
    for known in settings.admin_hashes:
        admin |= hmac.compare_digest(presented, known)
    if not matched:
        raise Unauthorized("invalid API key")
    return Principal(key_id_of(presented), admin)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class AuthMiddleware:
    """Pure ASGI: authenticate HTTP requests from their headers alone, before the body is touched.

    Not a ``BaseHTTPMiddleware``: that wraps the request in a way that can buffer the body. Here a
    refused request never calls the application, so nothing is read, parsed or spooled to disk.
    """

    def __init__(self, app: Any, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or is_public(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        try:
            scope[PRINCIPAL_SCOPE_KEY] = authenticate(self.settings, authorization)
        except Unauthorized as exc:
            await _send_401(send, str(exc))
            return
        await self.app(scope, receive, send)


async def _send_401(send: Any, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": 401,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ],
    })
    await send({"type": "http.response.body", "body": body})
