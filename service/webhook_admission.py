"""Admission of a request's webhook: refused (422) before anything is queued when it must not be called."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from jobstore.settings import Settings
from jobstore.webhook_targets import WebhookUrlError, resolve_webhook_url, webhook_target
from service.admission import ApiError


def check_webhook(settings: Settings, url: str | None, events: Iterable[str] | None) -> dict[str, Any] | None:
    """The job record's webhook target, or None without a URL. 422 (field ``webhook``) for a URL that is
    not http(s), does not resolve, or resolves to a private, loopback, link-local or reserved address
    (unless the settings allow it), and when the server has no signing secret."""
    if url is None:
        if events is not None:
            raise ApiError(422, "webhook_events needs a webhook URL", field="webhook_events")
        return None
    if not settings.webhook_secret:
        raise ApiError(422, "this server sends no webhooks (URAE_WEBHOOK_SECRET is not set)", field="webhook")
    try:
        resolve_webhook_url(url, allow_private=settings.webhook_allow_private, allow_hosts=settings.webhook_allow_hosts)
    except WebhookUrlError as exc:
        raise ApiError(422, f"webhook {exc}", field="webhook") from None
    try:
        return webhook_target(url, events, settings.webhook_progress_interval_s)
    except WebhookUrlError as exc:
        raise ApiError(422, str(exc), field="webhook_events") from None
