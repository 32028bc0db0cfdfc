"""API keys: a Bearer token compared, as a SHA-256 digest, in constant time against the configured ones."""

from __future__ import annotations

import hmac

from jobstore.settings import Settings, hash_api_key

OPEN_ACCESS_OWNER = "open"


class Unauthorized(Exception):
    """Missing or wrong API key."""


def authenticate(settings: Settings, authorization: str | None) -> str:
    """Check an ``Authorization`` header; returns the caller's identity (a short key digest).

    Every configured digest is compared, whatever matches first, so the time taken does not tell
    which key (or how much of one) was right.
    """
    if settings.open_access:
        return OPEN_ACCESS_OWNER
    if not authorization:
        raise Unauthorized("missing Authorization header: send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    presented = hash_api_key(token.strip())
    matched = False
    for known in settings.key_hashes:
        matched |= hmac.compare_digest(presented, known)
    if not matched:
        raise Unauthorized("invalid API key")
    return presented[:16]
