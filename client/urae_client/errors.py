"""The one exception the client raises."""

from __future__ import annotations

from typing import Any


class UraeError(Exception):
    """Any failure: an error answer of the API, a job that could not be followed, or no connection.

    ``status``: the HTTP status (None when no answer came); ``detail``: the server's message;
    ``field``: the input at fault, as the API names it (``width``, ``adapters[0].name``, ``body``);
    ``retry_after``: seconds to wait before sending again (429, 503, 507).
    """

    def __init__(self, detail: str, status: int | None = None, field: str | None = None,
                 retry_after: float | None = None, body: Any = None) -> None:
        super().__init__(f"{status}: {detail}" if status is not None else detail)
        self.detail = detail
        self.status = status
        self.field = field
        self.retry_after = retry_after
        self.body = body
