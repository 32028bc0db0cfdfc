"""One delivery attempt of one job event, and what follows it: done, retried later, or given up."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from standardwebhooks import Webhook

from jobstore.contract import WEBHOOK_FUNCTION, WEBHOOK_QUEUE
from jobstore.jobs import JobRecords
from jobstore.queues import connect, rq_queue
from jobstore.settings import Settings, get_settings
from jobstore.webhook_targets import DELIVERY_JOB_TIMEOUT_S, WebhookUrlError, resolve_webhook_url

log = logging.getLogger("urae.webhooks")
USER_AGENT = "urae-serve-webhooks"


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


def send(settings: Settings, url: str, message_id: str, body: str) -> AttemptOutcome:
    """POST the body to the URL, connecting to an address checked just now (no DNS rebinding
    between the check and the connection); redirects are not followed."""
    try:
        addresses = resolve_webhook_url(
            url, allow_private=settings.webhook_allow_private, allow_hosts=settings.webhook_allow_hosts
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
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    outcome = AttemptOutcome(None, "no address to connect to", retry=True)
    with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False) as client:
        # Each checked address in turn until one accepts the connection (a host name may have an IPv6
        # and an IPv4 address, and the receiver listen on one of them only).
        for ip in addresses:
            pinned = urlunsplit((parts.scheme, f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}",
                                 parts.path or "/", parts.query, ""))
            try:
                # Streamed and closed unread: a receiver cannot make this process read a large answer.
                with client.stream("POST", pinned, content=body.encode(), headers=headers, auth=auth,
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


def next_delay(settings: Settings, attempt: int) -> float:
    """Seconds before attempt ``attempt + 1``: exponential, capped."""
    return float(min(settings.webhook_backoff_s * 2 ** (attempt - 1), settings.webhook_backoff_max_s))


_records: JobRecords | None = None


def _job_records(settings: Settings) -> JobRecords:
    global _records
    if _records is None:
        _records = JobRecords(connect(settings.redis_url, settings.redis_socket_timeout_s), settings.result_ttl_s)
    return _records


def deliver(delivery: dict[str, Any]) -> str:
    """RQ job: one attempt; records it in the job; queues the next one (backoff) or gives up.

    Returns delivered, retrying, gave_up or refused.
    """
    settings = get_settings()
    records = _job_records(settings)
    attempt = int(delivery["attempt"])
    outcome = send(settings, delivery["url"], delivery["message_id"], delivery["body"])
    now = time.time()
    if outcome.delivered:
        result = "delivered"
    elif not outcome.retry:
        result = "refused"
    else:
        delay = next_delay(settings, attempt)
        # Give up when the next attempt would start past the bounded retry time.
        result = "gave_up" if now + delay - float(delivery["first_attempt_at"]) > settings.webhook_retry_for_s else "retrying"
    entry: dict[str, Any] = {
        "event": delivery["event"], "attempt": attempt, "status_code": outcome.status_code,
        "error": outcome.error, "at": round(now, 3), "outcome": result, "id": delivery["message_id"],
    }
    if result == "retrying":
        entry["next_attempt_in_s"] = delay
    records.record_webhook_attempt(delivery["job_id"], entry)
    if result == "retrying":
        rq_queue(records.conn, WEBHOOK_QUEUE).enqueue_in(
            timedelta(seconds=delay), WEBHOOK_FUNCTION, {**delivery, "attempt": attempt + 1},
            job_timeout=DELIVERY_JOB_TIMEOUT_S, result_ttl=600, failure_ttl=24 * 3600,
            description=f"webhook {delivery['event']} {delivery['job_id']} attempt {attempt + 1}",
        )
    log.info("webhook %s of job %s, attempt %d: %s%s", delivery["event"], delivery["job_id"], attempt, result,
             f" ({outcome.error})" if outcome.error else "")
    return result
