"""Server-Sent Events of jobs, for any number of open streams, on a bounded number of Redis connections.

A stream waiting for its job's next event holds no Redis connection: one reader per API process
(``EventHub``) blocks on every watched job's event stream with one ``XREAD`` on a connection of its
own, and hands each new entry to every open stream of that job. What a stream reads itself (the
history when it opens, the latest preview, the job's status now and then) are short commands on the
API's shared, bounded pool.

Open streams are counted per key and in all: past ``URAE_MAX_EVENT_STREAMS_PER_KEY`` a key gets 429
with Retry-After, past ``URAE_MAX_EVENT_STREAMS`` anyone gets 503 with Retry-After; either answer means
nothing was opened.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from jobstore.contract import TERMINAL_STATUSES, job_events_key, job_key, job_preview_key
from service.admission import ApiError

log = logging.getLogger("urae.service")

StreamId = tuple[int, int]
_STREAM_ID_RE = re.compile(r"^\d{1,20}-\d{1,20}$")

# How long the reader's XREAD blocks: the longest a newly watched job waits to be included.
READ_BLOCK_S = 0.25
# Entries the reader takes per job and round, and a stream may have waiting before it is left to
# catch up by itself (a client that reads slower than its job writes).
READ_COUNT = 200
MAX_PENDING = 1000
# How long a stream waits for an event before it looks at its client and its job again.
IDLE_CHECK_S = 5.0

RECONNECT_EVENT = (
    "event: reconnect\nretry: 1000\n"
    'data: {"detail": "the server is shutting down; reconnect with Last-Event-ID to continue"}\n\n'
)
STORE_UNAVAILABLE_EVENT = 'event: error\ndata: {"detail": "event store unavailable"}\n\n'
_REDIS_DOWN = (aioredis.ConnectionError, aioredis.TimeoutError)


def parse_stream_id(value: bytes | str) -> StreamId:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def valid_stream_id(value: str) -> bool:
    """A Redis stream id: two unsigned 64-bit integers (Redis answers an error for anything else)."""
    if not _STREAM_ID_RE.match(value):
        return False
    return all(int(part) < 2**64 for part in value.split("-"))


def _format(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


@dataclass(eq=False)
class _Subscriber:
    key: bytes
    last_id: StreamId  # the newest entry handed to this stream
    pending: collections.deque[tuple[bytes, dict[bytes, bytes]]] = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    store_lost: bool = False
    # Left behind by the reader (too much pending): the stream reads the rest itself.
    detached: bool = False


class EventHub:
    """One Redis reader fanning job events out to every open stream of this process, and the counts
    that bound how many streams are open."""

    def __init__(self, redis_url: str, socket_timeout_s: float, max_streams: int, max_streams_per_key: int,
                 retry_after_s: int):
        # The reader's own connection: its blocking read never takes one from the shared pool.
        self._reader = aioredis.Redis.from_url(
            redis_url, socket_timeout=READ_BLOCK_S + socket_timeout_s, socket_connect_timeout=socket_timeout_s,
            max_connections=1,
        )
        self.max_streams = max_streams
        self.max_streams_per_key = max_streams_per_key
        self.retry_after_s = retry_after_s
        self.open_per_key: collections.Counter[str] = collections.Counter()
        self._subscribers: dict[bytes, set[_Subscriber]] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._previews: dict[str, tuple[StreamId, asyncio.Task[Any]]] = {}
        self.shutting_down = False

    @property
    def open_streams(self) -> int:
        return sum(self.open_per_key.values())

    # -- admission ------------------------------------------------------------------------------
    def acquire(self, key_id: str) -> Callable[[], None]:
        """Count one more open stream for ``key_id``; the release function. ApiError 429 (this key
        has its maximum open) or 503 (the process has its maximum open); nothing is opened then."""
        if self.open_per_key[key_id] >= self.max_streams_per_key:
            raise ApiError(
                429, f"this API key already has {self.max_streams_per_key} event streams open "
                "(URAE_MAX_EVENT_STREAMS_PER_KEY); close one or retry later",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        if self.open_streams >= self.max_streams:
            raise ApiError(
                503, f"the server has its maximum of {self.max_streams} event streams open; retry later",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.open_per_key[key_id] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.open_per_key[key_id] -= 1
                if self.open_per_key[key_id] <= 0:
                    del self.open_per_key[key_id]

        return release

    # -- the reader -----------------------------------------------------------------------------
    def _subscribe(self, key: bytes, last_id: StreamId) -> _Subscriber:
        subscriber = _Subscriber(key, last_id)
        self._subscribers.setdefault(key, set()).add(subscriber)
        self._changed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._read_forever(), name="event-hub")
        return subscriber

    def _unsubscribe(self, subscriber: _Subscriber) -> None:
        subscribers = self._subscribers.get(subscriber.key)
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self._subscribers[subscriber.key]

    async def _read_forever(self) -> None:
        while True:
            if not self._subscribers:
                self._changed.clear()
                await self._changed.wait()
                continue
            # Each job's stream from the oldest entry one of its readers still needs.
            streams: dict[Any, Any] = {key: _format(min(s.last_id for s in subs)) for key, subs in self._subscribers.items()}
            try:
                batch: Any = await self._reader.xread(streams, count=READ_COUNT, block=int(READ_BLOCK_S * 1000))
            except Exception as exc:  # the reader must outlive anything: every open stream depends on it
                if not isinstance(exc, _REDIS_DOWN):
                    log.error("event streams: reading from Redis failed: %s: %s", type(exc).__name__, exc)
                # Every stream open now ends with an error event (its client reconnects later).
                for subscribers in list(self._subscribers.values()):
                    for subscriber in subscribers:
                        subscriber.store_lost = True
                        subscriber.wake.set()
                self._subscribers.clear()
                await asyncio.sleep(0.5)
                continue
            for key, entries in batch or ():
                self._deliver(key, entries)

    def _deliver(self, key: bytes, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        parsed = [(parse_stream_id(entry_id), entry_id, fields) for entry_id, fields in entries]
        for subscriber in list(self._subscribers.get(key, ())):
            for stream_id, entry_id, fields in parsed:
                if stream_id > subscriber.last_id:
                    subscriber.pending.append((entry_id, fields))
                    subscriber.last_id = stream_id
            if len(subscriber.pending) > MAX_PENDING:
                subscriber.detached = True
                self._unsubscribe(subscriber)
            subscriber.wake.set()

    async def latest_preview(self, pool: aioredis.Redis, job_id: str, marker: StreamId) -> bytes | None:
        """The job's latest preview, at least as new as the stream's preview ``marker`` (the preview is
        written before its marker). One read serves every stream of the job at that marker or an older
        one; the read is its own task, so a stream that goes away does not cancel it for the others."""
        cached = self._previews.get(job_id)
        if cached is None or cached[0] < marker:
            if len(self._previews) > 4 * max(1, len(self._subscribers)):
                watched = {key.decode().split(":")[2] for key in self._subscribers}
                self._previews = {j: c for j, c in self._previews.items() if j in watched}
            read = asyncio.get_running_loop().create_task(_get(pool, job_preview_key(job_id)))
            read.add_done_callback(lambda t: t.cancelled() or t.exception())  # seen by whoever waits, if anyone
            cached = self._previews[job_id] = (marker, read)
        return await asyncio.shield(cached[1])

    # -- shutdown -------------------------------------------------------------------------------
    def shut_down(self) -> None:
        """Tell every open stream to end with a reconnect event."""
        self.shutting_down = True
        for subscribers in self._subscribers.values():
            for subscriber in subscribers:
                subscriber.wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await self._reader.aclose()

    # -- one stream -----------------------------------------------------------------------------
    async def check_resume_id(self, pool: aioredis.Redis, job_id: str, last_event_id: str) -> None:
        """ApiError 400 unless ``last_event_id`` is 0 or the id of an event of this job's stream (or of
        one trimmed from it: its client resumes from the oldest event kept)."""
        if last_event_id == "0":
            return
        wrong = ApiError(400, "Last-Event-ID must be the id of an event of this stream, like 1700000000000-0",
                         field="Last-Event-ID")
        if not valid_stream_id(last_event_id):
            raise wrong
        key = job_events_key(job_id)
        if await pool.xrange(key, last_event_id, last_event_id, count=1):
            return
        try:
            info: Any = await pool.xinfo_stream(key)
        except aioredis.ResponseError:  # no stream at all
            raise wrong from None
        trimmed_up_to = info.get("max-deleted-entry-id")
        if trimmed_up_to and parse_stream_id(last_event_id) <= parse_stream_id(trimmed_up_to) != (0, 0):
            return
        raise wrong

    async def stream(self, pool: aioredis.Redis, job_id: str, request: Request, keepalive_s: float,
                     last_event_id: str) -> AsyncIterator[str]:
        """The job's events after ``last_event_id``; losing Redis at any point ends the stream with an
        error event, never a cut connection (the client reconnects with Last-Event-ID later)."""
        try:
            async for chunk in self._events(pool, job_id, request, keepalive_s, parse_stream_id(last_event_id)):
                yield chunk
        except _REDIS_DOWN:
            yield STORE_UNAVAILABLE_EVENT

    async def _events(self, pool: aioredis.Redis, job_id: str, request: Request, keepalive_s: float,
                      last_id: StreamId) -> AsyncIterator[str]:
        key = job_events_key(job_id).encode()
        preview_sent = -1
        loop = asyncio.get_running_loop()
        next_keepalive = loop.time() + keepalive_s
        subscriber: _Subscriber | None = None
        try:
            while True:
                if self.shutting_down:
                    yield RECONNECT_EVENT
                    return
                if subscriber is None:
                    # What the stream holds now, read on the shared pool; then the reader takes over.
                    ended = await _job_ended(pool, job_id)
                    batch: Any = await pool.xread({key: _format(last_id)}, count=READ_COUNT)
                    entries = batch[0][1] if batch else []
                    if not entries and ended:
                        return
                    if len(entries) < READ_COUNT and not ended:
                        subscriber = self._subscribe(key, last_id if not entries else parse_stream_id(entries[-1][0]))
                else:
                    if subscriber.store_lost:
                        yield STORE_UNAVAILABLE_EVENT
                        return
                    entries = list(subscriber.pending)
                    subscriber.pending.clear()
                    if subscriber.detached and not entries:
                        subscriber = None  # read the rest itself, from the last entry sent
                        continue
                    if not entries:
                        subscriber.wake.clear()
                        wait = min(IDLE_CHECK_S, max(0.0, next_keepalive - loop.time()))
                        try:
                            await asyncio.wait_for(subscriber.wake.wait(), timeout=wait)
                            continue
                        except TimeoutError:
                            pass
                        if await request.is_disconnected() or await _job_ended(pool, job_id, gone_only=True):
                            return
                        if loop.time() >= next_keepalive:
                            next_keepalive = loop.time() + keepalive_s
                            yield ": keep-alive\n\n"
                        continue
                for entry_id, fields in entries:
                    last_id = parse_stream_id(entry_id)
                    data = json.loads(fields[b"data"])
                    if data.get("type") == "preview":
                        # The stream holds only a marker; the image is the latest one kept (so a replay
                        # sends the newest preview once, never a backlog of them).
                        preview = await self._preview_event(pool, job_id, preview_sent, last_id)
                        if preview is None:
                            continue
                        data = preview
                        preview_sent = int(data["step"])
                    yield f"id: {entry_id.decode()}\nevent: {data.get('type', 'status')}\ndata: {json.dumps(data)}\n\n"
                    if data.get("type") == "status" and data.get("status") in TERMINAL_STATUSES:
                        return
                next_keepalive = loop.time() + keepalive_s
        finally:
            if subscriber is not None:
                self._unsubscribe(subscriber)

    async def _preview_event(self, pool: aioredis.Redis, job_id: str, sent_step: int,
                             marker: StreamId) -> dict[str, Any] | None:
        """The job's latest preview as an event, or None when it is no newer than the one already sent."""
        raw = await self.latest_preview(pool, job_id, marker)
        if raw is None:
            return None
        preview = json.loads(raw)
        if int(preview.get("step", -1)) <= sent_step:
            return None
        return {"type": "preview", **preview}


async def _get(pool: aioredis.Redis, key: str) -> Any:
    return await pool.get(key)


async def _job_ended(pool: aioredis.Redis, job_id: str, gone_only: bool = False) -> bool:
    """The job ended (or its record expired; with ``gone_only``, only the latter counts)."""
    status: Any = await pool.hget(job_key(job_id), "status")
    if status is None:
        return True
    return not gone_only and status.decode() in TERMINAL_STATUSES


class EventStreamResponse(StreamingResponse):
    """A streaming response that gives its open-stream slot back however the stream ends (even when
    it never starts)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None], **kwargs: Any):
        super().__init__(content, media_type="text/event-stream", **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
