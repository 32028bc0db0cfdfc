"""What the API answers, as small typed objects (the raw JSON stays available as ``raw``)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

TERMINAL_STATUSES = ("finished", "failed", "canceled")


@dataclass(frozen=True)
class Progress:
    stage: str
    step: int
    total: int
    loss: float | None = None
    eta_s: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Progress:
        return cls(stage=str(data.get("stage", "")), step=int(data.get("step", 0)), total=int(data.get("total", 0)),
                   loss=data.get("loss"), eta_s=data.get("eta_s"))


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of a job: ``type`` is ``status``, ``progress`` or ``preview``."""

    type: str
    data: dict[str, Any]
    id: str | None = None

    @property
    def status(self) -> str | None:
        return self.data.get("status") if self.type == "status" else None

    @property
    def terminal(self) -> bool:
        return self.type == "status" and self.data.get("status") in TERMINAL_STATUSES

    @property
    def progress(self) -> Progress | None:
        return Progress.from_json(self.data) if self.type == "progress" else None

    @property
    def image(self) -> bytes | None:
        """A preview's JPEG bytes, decoded from its data URL (None for other events)."""
        url = self.data.get("image") if self.type == "preview" else None
        if not isinstance(url, str) or "," not in url:
            return None
        try:
            return base64.b64decode(url.split(",", 1)[1], validate=True)
        except (binascii.Error, ValueError):
            return None


@dataclass(frozen=True)
class JobState:
    """A job as GET /jobs/{id} answers it."""

    id: str
    kind: str
    status: str
    progress: Progress | None
    result: dict[str, Any] | None
    error: str | None
    warnings: list[str]
    queue_position: int | None
    timings: dict[str, float]
    images: list[str]
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobState:
        progress = data.get("progress")
        return cls(
            id=data["id"], kind=data.get("kind", ""), status=data.get("status", ""),
            progress=Progress.from_json(progress) if progress else None, result=data.get("result"),
            error=data.get("error"), warnings=list(data.get("warnings") or []),
            queue_position=data.get("queue_position"), timings=dict(data.get("timings") or {}),
            images=list((data.get("links") or {}).get("images") or []), raw=data,
        )

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class Adapter:
    name: str
    builtin: bool
    version: str | None
    rank: int | None
    export_rank: int | None
    size_bytes: int | None
    source: str | None
    description: str
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Adapter:
        return cls(name=data["name"], builtin=bool(data.get("builtin", False)), version=data.get("version"),
                   rank=data.get("rank"), export_rank=data.get("export_rank"), size_bytes=data.get("size_bytes"),
                   source=data.get("source"), description=data.get("description") or "", raw=data)


@dataclass(frozen=True)
class Dataset:
    name: str
    size_bytes: int
    files: int
    images: int
    created_at: float
    last_used_at: float | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Dataset:
        return cls(name=data["name"], size_bytes=int(data.get("size_bytes", 0)), files=int(data.get("files", 0)),
                   images=int(data.get("images", 0)), created_at=float(data.get("created_at", 0.0)),
                   last_used_at=data.get("last_used_at"), raw=data)


class EventStreamParser:
    """Turns the lines of a text/event-stream into Events (comments and keep-alives are skipped)."""

    def __init__(self) -> None:
        self._type = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> Event | None:
        """One line without its newline; returns an Event when the line ends one."""
        if line == "":
            event = self._flush()
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        return None

    def _flush(self) -> Event | None:
        if not self._data and not self._type:
            return None
        kind, text, event_id = self._type or "message", "\n".join(self._data), self._id
        self._type, self._data, self._id = "", [], None
        try:
            data = json.loads(text) if text else {}
        except json.JSONDecodeError:
            data = {"text": text}
        return Event(type=kind, data=data if isinstance(data, dict) else {"value": data}, id=event_id)
