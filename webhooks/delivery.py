"""One delivery attempt of one job event, and what follows it: done, retried later, or given up.

An attempt is over within ``URAE_WEBHOOK_TIMEOUT_S`` whatever the receiver does: the address check, the
connection, sending the body and reading the answer's status share one deadline (httpx's own timeouts
bound each read, so a receiver dripping a byte every few seconds would hold it forever). An attempt cut
by the deadline is a failed attempt like any other: recorded, and retried.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from standardwebhooks import Webhook

from jobstore.settings import Settings
from jobstore.webhook_targets import WebhookUrlError, resolve_webhook_url, scrub

USER_AGENT = "urae-serve-webhooks"
_ssl_context: ssl.SSLContext | None = None


@dataclass(frozen=True)
class AttemptOutcome:
    status_code: int | None
    error: str | None
    retry: bool  # worth trying again (a refused address is not)

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def signed_headers(secret: str, message_id: str, body: str, now: datetime | None = None) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt (a fresh timestamp per attempt, the same id)."""
    now = now or datetime.now(UTC)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, now, body),
    }


async def attempt(settings: Settings, url: str, message_id: str, body: str) -> AttemptOutcome:
    """POST the body to the URL once, all of it within ``URAE_WEBHOOK_TIMEOUT_S``. Error texts never
    hold the URL's credentials."""
    limit = settings.webhook_timeout_s
    try:
        async with asyncio.timeout(limit):
            outcome = await _attempt(settings, url, message_id, body)
    except TimeoutError:
        outcome = AttemptOutcome(None, f"no answer within {limit:g} s", retry=True)
    if outcome.error:
        outcome = AttemptOutcome(outcome.status_code, scrub(outcome.error, url), outcome.retry)
    return outcome


def send(settings: Settings, url: str, message_id: str, body: str) -> AttemptOutcome:
    """``attempt`` from synchronous code."""
    return asyncio.run(attempt(settings, url, message_id, body))


def _tls() -> ssl.SSLContext:
    global _ssl_context
    if _ssl_context is None:  # one for every attempt: making one costs milliseconds of CPU
        _ssl_context = ssl.create_default_context()
    return _ssl_context


async def _attempt(settings: Settings, url: str, message_id: str, body: str) -> AttemptOutcome:
    """Connect to an address checked just now (no DNS rebinding between the check and the connection);
    redirects are not followed."""
    try:
        addresses = await asyncio.to_thread(
            resolve_webhook_url, url, allow_private=settings.webhook_allow_private,
            allow_hosts=settings.webhook_allow_hosts,
        )
    except WebhookUrlError as exc:
        return AttemptOutcome(None, f"refused: the URL {exc}", retry="does not resolve" in str(exc))
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    default_port = (parts.scheme == "https" and port == 443) or (parts.scheme == "http" and port == 80)
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "host": host if default_port else f"{host}:{port}",
        **signed_headers(settings.webhook_secret, message_id, body),
    }
    auth = (parts.username or "", parts.password or "") if parts.username else None
    # TLS: the certificate is checked against the URL's host name, not the address.
    extensions: dict[str, Any] = {"sni_hostname": host} if parts.scheme == "https" else {}
    outcome = AttemptOutcome(None, "no address to connect to", retry=True)
    async with httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False,
                                 verify=_tls()) as client:
        # Each checked address in turn until one accepts the connection (a host name may have an IPv6
        # and an IPv4 address, and the receiver listen on one of them only).
        for ip in addresses:
            pinned = urlunsplit((parts.scheme, f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}",
                                 parts.path or "/", parts.query, ""))
            try:
                # Streamed and closed unread: a receiver cannot make this process read a large answer.
                async with client.stream("POST", pinned, content=body.encode(), headers=headers, auth=auth,
                                         extensions=extensions) as response:
                    code = response.status_code
            except httpx.ConnectError as exc:
                outcome = AttemptOutcome(None, f"cannot connect to {ip}: {exc}"[:300], retry=True)
                continue
            except httpx.TimeoutException:
                return AttemptOutcome(None, f"no answer within {settings.webhook_timeout_s:g} s", retry=True)
            except httpx.HTTPError as exc:
                return AttemptOutcome(None, f"{type(exc).__name__}: {exc}"[:300], retry=True)
            if 200 <= code < 300:
                return AttemptOutcome(code, None, retry=False)
            return AttemptOutcome(code, f"the receiver answered {code}", retry=True)
    return outcome


def next_delay(settings: Settings, attempt_number: int) -> float:
    """Seconds before attempt ``attempt_number + 1``: exponential, capped."""
    return float(min(settings.webhook_backoff_s * 2 ** (attempt_number - 1), settings.webhook_backoff_max_s))


@dataclass(frozen=True)
class AttemptResult:
    """What an attempt leads to: ``outcome`` (delivered, retrying, gave_up or refused), the entry the
    job records, and for a retry the wait before the next attempt."""

    outcome: str
    entry: dict[str, Any]
    delay_s: float | None = None


def judge(settings: Settings, delivery: dict[str, Any], outcome: AttemptOutcome, now: float) -> AttemptResult:
    """Delivered, refused, retried after the backoff, or given up past ``URAE_WEBHOOK_RETRY_FOR_S``."""
    attempt_number = int(delivery["attempt"])
    delay: float | None = None
    if outcome.delivered:
        result = "delivered"
    elif not outcome.retry:
        result = "refused"
    else:
        delay = next_delay(settings, attempt_number)
        # Give up when the next attempt would start past the bounded retry time.
        late = now + delay - float(delivery["first_attempt_at"]) > settings.webhook_retry_for_s
        result = "gave_up" if late else "retrying"
    entry: dict[str, Any] = {
        "event": delivery["event"], "attempt": attempt_number, "status_code": outcome.status_code,
        "error": outcome.error, "at": round(now, 3), "outcome": result, "id": delivery["message_id"],
    }
    if result == "retrying":
        entry["next_attempt_in_s"] = delay
        return AttemptResult(result, entry, delay)
    return AttemptResult(result, entry)
