"""Bounds on what a client can make the API read: request bodies per route, headers.

Starlette parses a body (JSON into memory, multipart into temp files) before any route code runs, so
the bounds live below the app:

- ``BodyLimitMiddleware`` (pure ASGI, outermost): a Content-Length over the route's limit is answered
  413 at the app's first read of the body (after authentication has had its say), before a byte of
  it is read; a streamed or chunked body is cut as soon as it passes the
  limit (Starlette's form parser then closes its temp files) and answered 413; too many headers are
  answered 431. Any answer given before the body was read to its end (these, a 401) closes the
  connection, so the rest of the body is never read.
- ``BoundedHttpToolsProtocol``: uvicorn's httptools protocol with a bound on the bytes of the request
  line and headers (uvicorn has none), so a 128 MB header cannot stall the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.formparsers import MultiPartException

from jobstore.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Multipart framing around an upload: boundaries, part headers and the small form fields (name,
# description, recipe JSON).
MULTIPART_OVERHEAD_BYTES = 64 * 1024


class BodyTooLarge(MultiPartException):
    """Raised into the app by ``receive`` once a body passed its route's limit. A MultiPartException, so
    Starlette's form parser closes (and so deletes) the temp files it spooled before the cut."""


@dataclass(frozen=True)
class BodyLimits:
    """The largest body each route accepts; every route not listed gets ``json``."""

    json: int
    adapter_upload: int
    dataset_upload: int
    max_header_count: int

    @classmethod
    def from_settings(cls, settings: Settings) -> BodyLimits:
        return cls(
            json=settings.max_json_body_bytes,
            adapter_upload=settings.max_adapter_bytes + MULTIPART_OVERHEAD_BYTES,
            dataset_upload=settings.max_dataset_bytes + MULTIPART_OVERHEAD_BYTES,
            max_header_count=settings.max_header_count,
        )

    def for_route(self, method: str, path: str) -> int:
        if method == "POST" and path.rstrip("/") == "/adapters":
            return self.adapter_upload
        if method == "POST" and path.rstrip("/") in ("/finetune", "/datasets"):
            return self.dataset_upload
        return self.json


async def _refuse(send: Send, status: int, detail: str, field: str | None = None) -> None:
    body: dict[str, Any] = {"detail": detail}
    if field:
        body["field"] = field
    payload = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            # The unread rest of the body is never read: the connection ends with this answer.
            (b"connection", b"close"),
        ],
    })
    await send({"type": "http.response.body", "body": payload})


class BodyLimitMiddleware:
    """Refuse request bodies larger than their route's limit while (or before) they arrive."""

    def __init__(self, app: ASGIApp, limits: BodyLimits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if len(headers) > self.limits.max_header_count:
            await _refuse(send, 431, f"more than {self.limits.max_header_count} request headers")
            return
        limit = self.limits.for_route(scope["method"], scope["path"])
        too_large = f"the request body is larger than the limit of {limit} bytes for {scope['method']} {scope['path']}"
        declared_too_large = False
        for name, value in headers:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _refuse(send, 400, "Content-Length is not a number")
                    return
                # Not answered here: what comes first (a 401 from authentication, a 404) still
                # answers; the app's first read of the body gets the 413, before a byte is read.
                declared_too_large = declared > limit

        received = 0
        exceeded = False
        response_started = False
        has_body = any(
            (name == b"content-length" and value.strip() not in (b"", b"0")) or name == b"transfer-encoding"
            for name, value in headers
        )
        body_read = not has_body

        async def bounded_receive() -> Message:
            nonlocal received, exceeded
            nonlocal body_read
            if exceeded or declared_too_large:
                exceeded = True
                raise BodyTooLarge(too_large)
            message = await receive()
            if message["type"] == "http.request":
                body_read = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge(too_large)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded:
                # Whatever the app made of the cut body (a 400 for a broken form, a 422), the answer is 413.
                if not response_started and message["type"] == "http.response.start":
                    response_started = True
                    await _refuse(send, 413, too_large)
                return
            if message["type"] == "http.response.start":
                response_started = True
                if not body_read:
                    # Answered (a 401, a 404) before the body was read: end the connection with the
                    # answer, or the server would go on reading the unread rest only to drop it.
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except BodyTooLarge:
            if not response_started:
                await _refuse(send, 413, too_large)


def bounded_httptools_protocol(max_header_bytes: int) -> type:
    """uvicorn's httptools protocol, refusing (431) a request line plus headers over ``max_header_bytes``."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[misc]
        _awaiting_headers = True
        _header_bytes = 0
        _refused = False

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._awaiting_headers:
                # Checked on what arrived before this chunk: the headers plus at most one read
                # (asyncio reads at most 256 KiB) are ever buffered.
                if self._header_bytes > max_header_bytes:
                    self._refuse_headers()
                    return
                self._header_bytes += len(data)
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._awaiting_headers = False
            self._header_bytes = 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._awaiting_headers = True

        def _refuse_headers(self) -> None:
            payload = json.dumps({"detail": f"the request line and headers exceed {max_header_bytes} bytes"}).encode()
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
            )
            self.transport.close()
            self._refused = True

    return BoundedHttpToolsProtocol
