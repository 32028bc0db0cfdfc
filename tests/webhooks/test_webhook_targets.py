"""Which webhook URLs may be called, and the retry schedule (pure functions; no network beyond the
resolver for literal addresses and localhost)."""

from __future__ import annotations

import ipaddress

import pytest

from jobstore.webhook_targets import WebhookUrlError, resolve_webhook_url, webhook_target


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x", "http://localhost:8080/x", "http://[::ffff:127.0.0.1]/x", "http://100.64.0.1/x",
    "http://192.0.2.1/x", "http://[fe80::1]/x", "http://[fc00::1]/x", "http://2130706433/x",
])
def test_loopback_shared_documentation_and_mapped_addresses_are_refused(url: str) -> None:
    with pytest.raises(WebhookUrlError, match="private, loopback"):
        resolve_webhook_url(url)


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


@pytest.mark.parametrize(("url", "reason"), [
    ("ftp://example.com/", "http"), ("javascript:alert(1)", "http"), ("http:///nohost", "no host"),
    ("http://example.com:99999/", "not a valid URL"), ("http://x/" + "a" * 2000, "longer than"),
])
def test_malformed_urls_say_why(url: str, reason: str) -> None:
    with pytest.raises(WebhookUrlError, match=reason):
        resolve_webhook_url(url)


def test_events_default_to_the_terminal_ones_and_unknown_ones_are_refused() -> None:
    assert webhook_target("https://h/x", None, 5.0)["events"] == ["completed", "failed", "canceled"]
    assert webhook_target("https://h/x", ["progress", "progress", "started"], 5.0)["events"] == ["progress", "started"]
    with pytest.raises(WebhookUrlError, match="unknown webhook event 'finished'"):
        webhook_target("https://h/x", ["finished"], 5.0)
    with pytest.raises(WebhookUrlError, match="at least one"):
        webhook_target("https://h/x", [], 5.0)


def test_backoff_doubles_and_is_capped() -> None:
    from jobstore.settings import Settings
    from webhooks.delivery import next_delay

    settings = Settings(api_keys="k", webhook_backoff_s=2.0, webhook_backoff_max_s=30.0)
    assert [next_delay(settings, attempt) for attempt in range(1, 7)] == [2, 4, 8, 16, 30, 30]
