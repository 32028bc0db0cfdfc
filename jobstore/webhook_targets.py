"""Webhook targets: which URLs may receive a job's events, and how a URL is shown.

Shared by the API (refuses a bad URL at submit, shows it without its credentials) and the webhook
worker (checks the URL again at delivery, against DNS rebinding). Imports no HTTP client: delivery
itself is ``webhooks.delivery``; deliveries wait in ``jobstore.webhook_deliveries``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from jobstore.contract import DEFAULT_WEBHOOK_EVENTS, MAX_WEBHOOK_URL_CHARS, WEBHOOK_EVENTS

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

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


# IPv6 ranges that carry an IPv4 address (RFC 4291, 2765, 6052, 8215, 3056, 4380): a connection to
# such an address reaches that IPv4 address (through the host's stack or a translator), so the IPv4
# address is what must be public. NAT64's local-use prefix may be any of RFC 6052's lengths inside it.
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")


def _rfc6052_ipv4(ip: ipaddress.IPv6Address, prefix_length: int) -> ipaddress.IPv4Address:
    """The IPv4 address embedded after a NAT64 prefix of ``prefix_length`` bits (RFC 6052, 2.2):
    its 32 bits follow the prefix, skipping bits 64-71 (the "u" octet)."""
    bits = int(ip)
    if prefix_length == 96:
        return ipaddress.IPv4Address(bits & 0xFFFFFFFF)
    without_u = ((bits >> 64) << 56) | (bits & ((1 << 56) - 1))  # 120 bits: bits 64-71 taken out
    return ipaddress.IPv4Address((without_u >> (120 - prefix_length - 32)) & 0xFFFFFFFF)


def embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 address embeds (mapped, compatible, translated, NAT64, 6to4,
    Teredo server and client, ISATAP); empty for an IPv4 address or a plain IPv6 one."""
    if isinstance(ip, ipaddress.IPv4Address):
        return []
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    found: list[ipaddress.IPv4Address] = []
    if any(ip in net for net in (_IPV4_MAPPED, _IPV4_COMPATIBLE, _IPV4_TRANSLATED, _NAT64_WELL_KNOWN)):
        found.append(low32)
    if ip in _NAT64_LOCAL_USE:
        found += [_rfc6052_ipv4(ip, length) for length in (48, 56, 64, 96)]
    if ip in _SIX_TO_FOUR and ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip in _TEREDO and ip.teredo is not None:
        found += list(ip.teredo)  # the server, and the client's (obfuscated) address
    if (int(ip) >> 32) & 0xFDFFFFFF == 0x00005EFE:  # ISATAP interface id: [02]00:5efe:a.b.c.d
        found.append(low32)
    return list(dict.fromkeys(found))


def reached_addresses(ip: IPAddress) -> list[IPAddress]:
    """What a connection to ``ip`` reaches: the address itself and every IPv4 address it embeds (an
    IPv4-mapped address is only its IPv4 address: it never leaves the host as IPv6)."""
    embedded: list[IPAddress] = list(embedded_ipv4(ip))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return embedded
    return [ip, *embedded]


def _public(ip: IPAddress) -> bool:
    # is_global is False for private, loopback, link-local, shared (CGNAT), reserved and documentation ranges.
    return ip.is_global and not ip.is_multicast


def _allowed(ip: IPAddress, networks: list[IPNetwork]) -> bool:
    """Every address ``ip`` reaches is public or inside an allowed network."""
    return all(_public(r) or any(r in network for network in networks) for r in reached_addresses(ip))


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
        raise WebhookUrlError(f"is not a valid URL ({scrub(str(exc), url)})") from None
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
        if not _allowed(ip, allowed_networks):
            inner = [str(r) for r in reached_addresses(ip) if r != ip]
            reaches = f" (which reaches {', '.join(inner)})" if inner else ""
            raise WebhookUrlError(
                f"host {host!r} resolves to {ip}{reaches}, a private, loopback, link-local or reserved address "
                "(allowed only by URAE_WEBHOOK_ALLOW_PRIVATE or URAE_WEBHOOK_ALLOW_HOSTS)"
            )
    return addresses


REDACTED = "***"


def redact_url(url: str) -> str:
    """A webhook URL as answers and logs show it: the user name and password (any user info), the value
    of every query parameter and the fragment replaced by ``***``; scheme, host, port and path kept."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a URL that cannot be parsed)"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = "&".join(
        f"{name}={REDACTED}" if has_value else REDACTED
        for name, has_value, _ in (p.partition("=") for p in parts.query.split("&") if p)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, REDACTED if parts.fragment else ""))


def url_secrets(url: str) -> list[str]:
    """The parts of a URL that ``redact_url`` hides (raw and percent-decoded), longest first."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found: set[str] = set()
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        found.update((userinfo, *userinfo.split(":", 1)))
    for piece in parts.query.split("&"):
        name, has_value, value = piece.partition("=")
        found.add(value if has_value else name)
    found.add(parts.fragment)
    found |= {unquote(s) for s in found}
    # Shorter strings are no secret worth the name, and replacing them would garble any message.
    return sorted((s for s in found if len(s) >= 4), key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """``text`` (an error message, a log line) with every secret of ``url`` replaced by ``***``."""
    for secret in url_secrets(url):
        text = text.replace(secret, REDACTED)
    return text


def webhook_target(url: str, events: Iterable[str] | None, progress_interval_s: float) -> dict[str, Any]:
    """What a job record keeps about its webhook (the ``webhook`` field)."""
    chosen = list(dict.fromkeys(events)) if events is not None else list(DEFAULT_WEBHOOK_EVENTS)
    if not chosen:
        raise WebhookUrlError(f"name at least one webhook event of {', '.join(WEBHOOK_EVENTS)} (or leave them out)")
    unknown = [e for e in chosen if e not in WEBHOOK_EVENTS]
    if unknown:
        raise WebhookUrlError(f"unknown webhook event {unknown[0]!r}; choose from {', '.join(WEBHOOK_EVENTS)}")
    return {"url": url, "events": chosen, "progress_interval_s": progress_interval_s}
