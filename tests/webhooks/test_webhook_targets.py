"""Which webhook URLs may be called, and the retry schedule (pure functions; no network beyond the
resolver for literal addresses and localhost)."""

from __future__ import annotations

import ipaddress
import re

import pytest

from jobstore.contract import MAX_WEBHOOK_URL_CHARS
from jobstore.webhook_targets import (
    WebhookUrlError,
    embedded_ipv4,
    redact_url,
    resolve_webhook_url,
    scrub,
    url_secrets,
    webhook_target,
)

REFUSED_TAIL = ("a private, loopback, link-local or reserved address "
                "(allowed only by URAE_WEBHOOK_ALLOW_PRIVATE or URAE_WEBHOOK_ALLOW_HOSTS)")


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x", "http://localhost:8080/x", "http://[::ffff:127.0.0.1]/x", "http://100.64.0.1/x",
    "http://192.0.2.1/x", "http://[fe80::1]/x", "http://[fc00::1]/x", "http://2130706433/x",
])
def test_loopback_shared_documentation_and_mapped_addresses_are_refused(url: str) -> None:
    with pytest.raises(WebhookUrlError, match="private, loopback"):
        resolve_webhook_url(url)


# Private IPv4 destinations, and every way IPv6 embeds an IPv4 address: a connection to the IPv6 form
# reaches the IPv4 one (through the host's stack, a NAT64 translator, a 6to4 or Teredo relay).
PRIVATE_V4 = ["127.0.0.1", "127.8.9.10", "10.20.30.40", "192.168.7.8", "172.16.5.4", "169.254.169.254",
              "100.64.1.2", "0.0.0.0"]


def _v6(value: int) -> str:
    return str(ipaddress.IPv6Address(value))


def _rfc6052(prefix: str, length: int, v4: str) -> str:
    """RFC 6052's embedding of ``v4`` after a NAT64 prefix of ``length`` bits (bits 64-71 stay zero)."""
    base, bits = int(ipaddress.IPv6Address(prefix)), int(ipaddress.IPv4Address(v4))
    if length == 96:
        return _v6(base | bits)
    before_u = max(0, 64 - length)  # IPv4 bits that fit between the prefix and the u octet
    high, low = bits >> (32 - before_u), bits & ((1 << (32 - before_u)) - 1)
    return _v6(base | (high << 64) | (low << (56 - (32 - before_u))))


def embeddings(v4: str) -> dict[str, str]:
    """Every IPv6 form of ``v4`` a webhook URL could name."""
    bits = int(ipaddress.IPv4Address(v4))
    forms = {
        "mapped": _v6(0xFFFF << 32 | bits),
        "compatible": _v6(bits),
        "translated": _v6(0xFFFF << 48 | bits),
        "nat64": _v6(0x64FF9B << 96 | bits),
        "6to4": _v6(0x2002 << 112 | bits << 80 | 1),
        "teredo-client": _v6(0x20010000 << 96 | 0x4136E378 << 64 | 0x8000 << 48 | 0x63BF << 32 | (bits ^ 0xFFFFFFFF)),
        "teredo-server": _v6(0x20010000 << 96 | bits << 64 | 0x8000 << 48 | 0x63BF << 32 | 0x7EFEFEFE),
        "isatap": _v6(0x2606_4700 << 96 | 0x5EFE << 32 | bits),
    }
    for length in (48, 56, 64, 96):
        forms[f"nat64-local/{length}"] = _rfc6052("64:ff9b:1::", length, v4)
    return forms


@pytest.mark.parametrize("v4", PRIVATE_V4)
def test_every_ipv6_embedding_of_a_private_ipv4_address_is_refused(v4: str) -> None:
    for form, v6 in embeddings(v4).items():
        # The helper above and the checker agree on where the IPv4 address sits.
        assert ipaddress.IPv4Address(v4) in embedded_ipv4(ipaddress.IPv6Address(v6)), (form, v6)
        # The message names the IPv4 address the IPv6 one reaches, so the refusal can be understood.
        with pytest.raises(WebhookUrlError, match=f"which reaches [^)]*{re.escape(v4)}") as info:
            resolve_webhook_url(f"http://[{v6}]:8080/hook")
        assert str(info.value).endswith(REFUSED_TAIL), (form, str(info.value))


def test_a_refusal_says_which_address_and_what_it_reaches_and_how_to_allow_it() -> None:
    with pytest.raises(WebhookUrlError) as plain:
        resolve_webhook_url("http://127.0.0.1:9/x")
    assert str(plain.value) == f"host '127.0.0.1' resolves to 127.0.0.1, {REFUSED_TAIL}"
    with pytest.raises(WebhookUrlError) as mapped:
        resolve_webhook_url("http://[::ffff:10.0.0.5]/x")
    assert str(mapped.value) == f"host '::ffff:10.0.0.5' resolves to ::ffff:a00:5 (which reaches 10.0.0.5), {REFUSED_TAIL}"
    # A NAT64 local-use address may embed its IPv4 address at any of four prefix lengths: all are listed.
    v6 = _rfc6052("64:ff9b:1::", 48, "10.1.2.3")
    reached = embedded_ipv4(ipaddress.IPv6Address(v6))
    assert len(reached) > 1 and ipaddress.IPv4Address("10.1.2.3") in reached
    with pytest.raises(WebhookUrlError) as nat64:
        resolve_webhook_url(f"http://[{v6}]/x")
    assert f"(which reaches {', '.join(map(str, reached))}), " in str(nat64.value)


def test_the_u_octet_of_a_nat64_address_does_not_hide_the_ipv4_address() -> None:
    """RFC 6052 puts bits 64-71 (the u octet) between the parts of the IPv4 address; whatever a
    caller writes there, the IPv4 address on either side of it is the one checked."""
    for length in (48, 56, 64):
        v6 = ipaddress.IPv6Address(int(ipaddress.IPv6Address(_rfc6052("64:ff9b:1::", length, "10.1.2.3"))) | 0xFF << 56)
        assert ipaddress.IPv4Address("10.1.2.3") in embedded_ipv4(v6), length
        with pytest.raises(WebhookUrlError, match=r"which reaches [^)]*\b10\.1\.2\.3\b"):
            resolve_webhook_url(f"http://[{v6}]/x")


def test_the_embedded_ipv4_address_decides_an_allow_list_and_public_embeddings_pass() -> None:
    for form in ("nat64", "6to4", "compatible"):
        v6 = embeddings("10.1.2.3")[form]
        assert resolve_webhook_url(f"http://[{v6}]/x", allow_hosts="10.0.0.0/8") == [ipaddress.ip_address(v6)], form
        with pytest.raises(WebhookUrlError):
            resolve_webhook_url(f"http://[{v6}]/x", allow_hosts="192.168.0.0/16")
        public = embeddings("93.184.215.14")[form]
        assert resolve_webhook_url(f"http://[{public}]/x") == [ipaddress.ip_address(public)], form


def test_a_public_address_passes_and_is_returned() -> None:
    assert resolve_webhook_url("https://93.184.215.14:8443/hook") == [ipaddress.ip_address("93.184.215.14")]


def test_allowing_by_network_by_host_name_or_all() -> None:
    assert resolve_webhook_url("http://127.0.0.1:9/x", allow_hosts="10.0.0.0/8, 127.0.0.0/8")
    # A network that does not hold the address allows nothing.
    with pytest.raises(WebhookUrlError):
        resolve_webhook_url("http://127.0.0.1:9/x", allow_hosts="10.0.0.0/8")
    assert resolve_webhook_url("http://LOCALHOST./x", allow_hosts="localhost")
    assert resolve_webhook_url("http://[::ffff:10.0.0.5]/x", allow_hosts="10.0.0.0/8") == [
        ipaddress.ip_address("::ffff:10.0.0.5")]
    assert resolve_webhook_url("http://10.9.8.7/x", allow_private=True)


def test_the_allow_list_as_an_operator_writes_it() -> None:
    """URAE_WEBHOOK_ALLOW_HOSTS: commas with or without spaces, empty items, a network written with
    its host bits set, a host name with a trailing dot."""
    assert resolve_webhook_url("http://127.0.0.1:9/x", allow_hosts="10.0.0.0/8,127.0.0.1/8")
    assert resolve_webhook_url("http://127.0.0.1:9/x", allow_hosts=",,127.0.0.0/8,")
    assert resolve_webhook_url("http://127.0.0.1:9/x", allow_hosts=" , 127.0.0.0/8")
    assert resolve_webhook_url("http://localhost/x", allow_hosts="LocalHost.")
    # The host name is matched whole: a name that only ends like an allowed one is refused.
    with pytest.raises(WebhookUrlError):
        resolve_webhook_url("http://localhost/x", allow_hosts="host")


@pytest.mark.parametrize(("url", "reason"), [
    ("ftp://example.com/", "must be an http:// or https:// URL"),
    ("javascript:alert(1)", "must be an http:// or https:// URL"),
    ("http:///nohost", "has no host"),
    ("http://example.com:99999/", "is not a valid URL (Port out of range 0-65535)"),
    ("http://example.com:abc/", "is not a valid URL (Port could not be cast to integer value as 'abc')"),
    ("http://[::1/x", "is not a valid URL (Invalid IPv6 URL)"),
    ("http://x/" + "a" * 2000, "is longer than 2000 characters"),
    ("http://no-such-host.invalid/x", "host 'no-such-host.invalid' does not resolve ("),
])
def test_malformed_urls_say_why(url: str, reason: str) -> None:
    with pytest.raises(WebhookUrlError) as info:
        resolve_webhook_url(url)
    assert str(info.value).startswith(reason)


def test_the_url_length_limit_is_inclusive() -> None:
    at_limit = "http://93.184.215.14/" + "a" * (MAX_WEBHOOK_URL_CHARS - len("http://93.184.215.14/"))
    assert len(at_limit) == MAX_WEBHOOK_URL_CHARS
    assert resolve_webhook_url(at_limit) == [ipaddress.ip_address("93.184.215.14")]
    with pytest.raises(WebhookUrlError, match="longer than"):
        resolve_webhook_url(at_limit + "a")


@pytest.mark.parametrize(("url", "shown"), [
    ("https://alice:zz-top-secret@hooks.example.com:8443/in/x?token=abc123&sig=a=b&flag#frag",
     "https://***@hooks.example.com:8443/in/x?token=***&sig=***&***#***"),
    ("https://bob:p@ss-word@hooks.example.com/x?a=1&&b=2", "https://***@hooks.example.com/x?a=***&b=***"),
    ("http://hooks.example.com:8080/plain/path", "http://hooks.example.com:8080/plain/path"),
    ("http://[::1/x", "(a URL that cannot be parsed)"),
])
def test_a_webhook_url_is_shown_without_its_credentials(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_error_messages_lose_every_secret_of_the_url_whole() -> None:
    url = ("https://alice:zz-top-secret@h.example/x?token=abc%2F123&sig=k3y9=v4lue&standalonesecret&k=abc&pin=q7w2"
           "#fragment9")
    secrets = url_secrets(url)
    assert set(secrets) == {
        "alice:zz-top-secret", "alice", "zz-top-secret", "abc%2F123", "abc/123", "k3y9=v4lue",
        "standalonesecret", "q7w2", "fragment9",
    }  # 4 characters are hidden; "abc" (3) is too short to be worth it
    assert scrub("pin q7w2, k abc", url) == "pin ***, k abc"
    assert [len(s) for s in secrets] == sorted((len(s) for s in secrets), reverse=True)
    # Longest first: the whole user info becomes one ***, not "***:***".
    assert scrub("auth alice:zz-top-secret refused", url) == "auth *** refused"
    assert scrub("password zz-top-secret, user alice", url) == "password ***, user ***"
    assert scrub("GET /x?token=abc/123 and abc%2F123", url) == "GET /x?token=*** and ***"
    assert scrub("sig k3y9=v4lue; standalonesecret; #fragment9", url) == "sig ***; ***; #***"
    # A password holding '@' or ':' is one secret.
    other = "https://bob:p@ss:word9@h.example/x"
    assert scrub("bad password p@ss:word9", other) == "bad password ***"
    assert url_secrets("http://[::1/x") == ["http://[::1/x"]
    assert url_secrets("https://h.example/x") == []


def test_events_default_to_the_terminal_ones_and_unknown_ones_are_refused() -> None:
    assert webhook_target("https://h/x", None, 5.0) == {
        "url": "https://h/x", "events": ["completed", "failed", "canceled"], "progress_interval_s": 5.0}
    assert webhook_target("https://h/x", ["progress", "progress", "started"], 2.5) == {
        "url": "https://h/x", "events": ["progress", "started"], "progress_interval_s": 2.5}
    with pytest.raises(WebhookUrlError) as unknown:
        webhook_target("https://h/x", ["finished"], 5.0)
    assert str(unknown.value) == (
        "unknown webhook event 'finished'; choose from started, progress, completed, failed, canceled")
    with pytest.raises(WebhookUrlError) as none:
        webhook_target("https://h/x", [], 5.0)
    assert str(none.value) == (
        "name at least one webhook event of started, progress, completed, failed, canceled (or leave them out)")


def test_backoff_doubles_and_is_capped() -> None:
    from jobstore.settings import Settings
    from webhooks.delivery import next_delay

    settings = Settings(api_keys="k", webhook_backoff_s=2.0, webhook_backoff_max_s=30.0)
    assert [next_delay(settings, attempt) for attempt in range(1, 7)] == [2, 4, 8, 16, 30, 30]
