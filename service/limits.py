"""Bounds on what a client can make the API read: request bodies per route, headers.

Starlette parses a body (JSON into memory, multipart into temp files) before any route code runs, so
the bounds live below the app:

- ``BodyLimitMiddleware`` (pure ASGI, outermost): a Content-Length over the route's limit is answered
  413 at the app's first read of the body (after authentication has had its say), before a byte of
  it is read; a streamed or chunked body is cut as soon as it passes the
  limit (Starlette's form parser then closes its temp files) and answered 413; too many headers are
  answered 431. Any answer given before the body was read to its end (these, a 401) closes the
  connection, so the rest of the body is never read.
- ``BoundedHttpToolsProtocol``: uvicorn's httptools protocol with bounds on the bytes of the request
  line and headers, on the time to send them, and on the connections open at once (uvicorn has none
  of them), so a 128 MB header cannot stall the event loop and thousands of slow or silent sockets
  cannot take the process's file descriptors.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
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
    generate: int
    adapter_upload: int
    dataset_upload: int
    max_header_count: int

    @classmethod
    def from_settings(cls, settings: Settings) -> BodyLimits:
        return cls(
            json=settings.max_json_body_bytes,
            # An input image travels base64-encoded in the JSON body: 4 characters per 3 bytes.
            generate=-(-settings.max_input_image_bytes * 4 // 3) + settings.max_json_body_bytes,
            adapter_upload=settings.max_adapter_bytes + MULTIPART_OVERHEAD_BYTES,
            dataset_upload=settings.max_dataset_bytes + MULTIPART_OVERHEAD_BYTES,
            max_header_count=settings.max_header_count,
        )

    def for_route(self, method: str, path: str) -> int:
        if method == "POST" and path.rstrip("/") == "/generate":
            return self.generate
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
                    await _refuse(send, 413, too_large, field="body")
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
                await _refuse(send, 413, too_large, field="body")


# File descriptors the API keeps for itself beyond client connections: Redis connections (the thread
# pool's and the async pool's), storage and temp files, logs.
FD_RESERVE = 256
# Pool threads that upload checks (spooling, archive extraction, header parsing, storing) may use at
# once, over every upload route: a burst of uploads waits for them without holding a thread, and
# never takes the pool from light requests.
UPLOAD_THREADS = 4


def effective_max_connections(settings: Settings) -> int:
    """URAE_MAX_CONNECTIONS, lowered to what the process's open-file limit leaves room for."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return settings.max_connections
    return max(16, min(settings.max_connections, soft - FD_RESERVE))


def max_event_streams(settings: Settings) -> int:
    """URAE_MAX_EVENT_STREAMS, at most 3/4 of the connection bound: streams never take every connection."""
    return max(1, min(settings.max_event_streams, effective_max_connections(settings) * 3 // 4))


def bounded_httptools_protocol(
    max_header_bytes: int, header_timeout_s: float | None = None, max_connections: int | None = None
) -> type:
    """uvicorn's httptools protocol, with bounds uvicorn does not have:

    - a request line plus headers over ``max_header_bytes`` is refused (431) as it arrives;
    - a client that has not sent a request's headers ``header_timeout_s`` after connecting (or after
      its previous answer) is cut off (408 when it had started, silently when it sent nothing);
    - at most ``max_connections`` connections are open: one more makes the connection that has waited
      longest for its headers go (an idle keep-alive or a slow client), or, when every connection is
      busy with a request, is answered 503 with Retry-After and closed.
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[misc]
        _awaiting_headers = True
        _header_bytes = 0
        _refused = False
        # Since when (monotonic) the connection waits for a request's headers; None while one runs.
        _waiting_since: float | None = None
        _request_started = False
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if max_connections is not None and len(self.connections) > max_connections:
                if not self._drop_longest_waiting():
                    self._answer_and_close(503, "Service Unavailable", "the server has its maximum of open connections; "
                                           "retry later", retry_after=True)
                    return
            self._wait_for_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._awaiting_headers:
                # Checked on what arrived before this chunk: the headers plus at most one read
                # (asyncio reads at most 256 KiB) are ever buffered.
                if self._header_bytes > max_header_bytes:
                    self._answer_and_close(431, "Request Header Fields Too Large",
                                           f"the request line and headers exceed {max_header_bytes} bytes")
                    return
                self._header_bytes += len(data)
            if self._waiting_since is not None:
                self._request_started = True
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._awaiting_headers = False
            self._header_bytes = 0
            self._stop_waiting()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._awaiting_headers = True

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self.pipeline:
                self._wait_for_headers()

        def _wait_for_headers(self) -> None:
            self._stop_waiting()
            self._waiting_since = time.monotonic()
            self._request_started = False
            if header_timeout_s is not None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _stop_waiting(self) -> None:
            self._waiting_since = None
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self._waiting_since is not None and not self.transport.is_closing():
                self._drop()

        def _drop(self) -> None:
            """End a connection that is waiting for headers: 408 when a request had begun."""
            if self._request_started:
                self._answer_and_close(408, "Request Timeout",
                                       f"the request line and headers did not arrive within {header_timeout_s:g} s")
            else:
                self._stop_waiting()
                self._refused = True
                self.transport.close()

        def _drop_longest_waiting(self) -> bool:
            waiting: list[Any] = [c for c in self.connections if c is not self
                                  and getattr(c, "_waiting_since", None) is not None and not c.transport.is_closing()]
            if not waiting:
                return False
            min(waiting, key=lambda c: c._waiting_since)._drop()
            return True

        def _answer_and_close(self, status: int, reason: str, detail: str, retry_after: bool = False) -> None:
            self._stop_waiting()
            payload = json.dumps({"detail": detail}).encode()
            extra = b"retry-after: 1\r\n" if retry_after else b""
            self.transport.write(
                f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n".encode() + extra
                + b"connection: close\r\ncontent-length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
            )
            self.transport.close()
            self._refused = True

    return BoundedHttpToolsProtocol
