"""Webhook targets: which URLs may receive a job's events, and queueing a delivery of one event.

Shared by the API (refuses a bad URL at submit), the job records (queue a delivery where a job's
status changes) and the webhook worker (checks the URL again at delivery, against DNS rebinding).
Imports no HTTP client: delivery itself is ``webhooks.delivery``.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import redis

from jobstore.contract import (
    DEFAULT_WEBHOOK_EVENTS,
    MAX_WEBHOOK_URL_CHARS,
    WEBHOOK_EVENTS,
    WEBHOOK_FUNCTION,
    WEBHOOK_QUEUE,
)
from jobstore.queues import rq_queue

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# An RQ delivery job's own time limit (one attempt: connect + send + read the answer, with slack).
DELIVERY_JOB_TIMEOUT_S = 120
# Attempts kept in a job record; the backoff bounds them long before this.
MAX_RECORDED_ATTEMPTS = 100


class WebhookUrlError(ValueError):
    """A webhook URL that must not be called; the message says why."""


def parse_allow_list(text: str) -> tuple[set[str], list[IPNetwork]]:
    """``URAE_WEBHOOK_ALLOW_HOSTS``: comma-separated host names and IP networks (CIDR) to allow."""
    hosts: set[str] = set()
    networks: list[IPNetwork] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            hosts.add(item.lower().rstrip("."))
    return hosts, networks


def _unmapped(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d) as the IPv4 address it reaches."""
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def _public(ip: IPAddress) -> bool:
    ip = _unmapped(ip)
    # is_global is False for private, loopback, link-local, shared (CGNAT), reserved and documentation ranges.
    return ip.is_global and not ip.is_multicast


def resolve_webhook_url(
    url: str, *, allow_private: bool = False, allow_hosts: str = "", resolve: bool = True
) -> list[IPAddress]:
    """Check a webhook URL; the addresses its host resolves to, every one of them allowed.

    Only http and https. A host that resolves to a private, loopback, link-local, multicast or
    reserved address is refused unless ``allow_private`` or the allow-list names the host or a
    network holding the address. Raises WebhookUrlError.
    """
    if len(url) > MAX_WEBHOOK_URL_CHARS:
        raise WebhookUrlError(f"is longer than {MAX_WEBHOOK_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise WebhookUrlError(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookUrlError("must be an http:// or https:// URL")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise WebhookUrlError("has no host")
    if not resolve:
        return []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookUrlError(f"host {host!r} does not resolve ({exc})") from None
    addresses: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if ip not in addresses:
            addresses.append(ip)
    if allow_private:
        return addresses
    allowed_hosts, allowed_networks = parse_allow_list(allow_hosts)
    if host.lower() in allowed_hosts:
        return addresses
    for ip in addresses:
        if not _public(ip) and not any(_unmapped(ip) in network for network in allowed_networks):
            raise WebhookUrlError(
                f"host {host!r} resolves to {ip}, a private, loopback, link-local or reserved address "
                "(allowed only by URAE_WEBHOOK_ALLOW_PRIVATE or URAE_WEBHOOK_ALLOW_HOSTS)"
            )
    return addresses


def webhook_target(url: str, events: Iterable[str] | None, progress_interval_s: float) -> dict[str, Any]:
    """What a job record keeps about its webhook (the ``webhook`` field)."""
    chosen = list(dict.fromkeys(events)) if events is not None else list(DEFAULT_WEBHOOK_EVENTS)
    if not chosen:
        raise WebhookUrlError(f"name at least one webhook event of {', '.join(WEBHOOK_EVENTS)} (or leave them out)")
    unknown = [e for e in chosen if e not in WEBHOOK_EVENTS]
    if unknown:
        raise WebhookUrlError(f"unknown webhook event {unknown[0]!r}; choose from {', '.join(WEBHOOK_EVENTS)}")
    return {"url": url, "events": chosen, "progress_interval_s": progress_interval_s}


def enqueue_delivery(
    conn: redis.Redis, job_id: str, kind: str, target: dict[str, Any], event: str, data: dict[str, Any],
    pipeline: Any = None,
) -> str:
    """Queue the delivery of one event to the job's webhook (on its own queue); the message id.

    The body is fixed here, once: every attempt sends the same bytes under the same ``webhook-id``,
    so a receiver can drop duplicates.
    """
    message_id = f"msg_{uuid.uuid4().hex}"
    body = json.dumps(
        {"type": f"job.{event}", "timestamp": datetime.now(UTC).isoformat(),
         "data": {"id": job_id, "kind": kind, **data}},
        separators=(",", ":"), default=str,
    )
    delivery = {"job_id": job_id, "event": event, "url": target["url"], "message_id": message_id, "body": body,
                "attempt": 1, "first_attempt_at": time.time()}
    rq_queue(conn, WEBHOOK_QUEUE).enqueue_call(
        WEBHOOK_FUNCTION, args=(delivery,), timeout=DELIVERY_JOB_TIMEOUT_S, result_ttl=600, failure_ttl=24 * 3600,
        description=f"webhook {event} {job_id}", pipeline=pipeline,
    )
    return message_id
