"""What both clients send and how they read answers: request bodies, forms and error mapping."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from urae_client.errors import UraeError

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# The API sends a keep-alive comment every URAE_SSE_KEEPALIVE_S (15 s): a read this long without a
# byte means the connection is gone.
EVENT_READ_TIMEOUT_S = 60.0
# Waits between attempts to reconnect an event stream (the server may be restarting).
RECONNECT_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 5.0)

AdapterArg = str | tuple[str, float] | Mapping[str, Any]
FileArg = str | os.PathLike[str] | bytes | IO[bytes]
# An input image: its bytes, a file's path, a ready data: URL, or {"job": id, "index": n} (an image of
# one of the caller's finished jobs).
ImageArg = bytes | str | os.PathLike[str] | Mapping[str, Any]


def api_key_from(api_key: str | None) -> str | None:
    return api_key if api_key is not None else os.environ.get("URAE_API_KEY")


def base_url_from(base_url: str | None) -> str:
    return (base_url or os.environ.get("URAE_API_URL") or DEFAULT_BASE_URL).rstrip("/")


def headers_for(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def raise_for_answer(response: httpx.Response) -> None:
    """Raise UraeError for any answer that is not a success (the body must already be read)."""
    if response.is_success or response.is_redirect:
        return
    body: Any = None
    detail = response.reason_phrase or f"HTTP {response.status_code}"
    field = None
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        body = response.text
    if isinstance(body, dict):
        detail = str(body.get("detail", detail))
        field = body.get("field")
    elif isinstance(body, str) and body.strip():
        detail = body.strip()[:500]
    retry_after: float | None = None
    header = response.headers.get("Retry-After")
    if header is not None:
        try:
            retry_after = float(header)
        except ValueError:
            retry_after = None
    raise UraeError(detail, status=response.status_code, field=field, retry_after=retry_after, body=body)


def transport_error(exc: httpx.TransportError, what: str) -> UraeError:
    return UraeError(f"{what}: {type(exc).__name__}: {exc}")


def adapters_json(adapters: Sequence[AdapterArg] | None) -> list[dict[str, Any]]:
    """``"name"``, ``("name", weight)`` or ``{"name": ..., "weight": ...}`` -> the API's list."""
    out: list[dict[str, Any]] = []
    for item in adapters or ():
        if isinstance(item, str):
            out.append({"name": item})
        elif isinstance(item, tuple):
            out.append({"name": item[0], "weight": float(item[1])})
        else:
            out.append(dict(item))
    return out


def generate_body(prompt: str, options: Mapping[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt}
    for key, value in options.items():
        if value is None:
            continue
        if key == "adapters":
            body[key] = adapters_json(value)
        elif key == "image":
            body[key] = image_json(value)
        else:
            body[key] = value
    return body


def refine_body(options: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in options.items() if value is not None}


def image_media_type(data: bytes) -> str:
    """The media type of a PNG, JPEG or WebP file, from its first bytes; ValueError for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise ValueError("the input image is not a PNG, JPEG or WebP file")


def image_json(image: ImageArg) -> str | dict[str, Any]:
    """An input image as the API takes it: a data: URL (bytes and files are encoded, with the media type
    their first bytes say) or ``{"job": id, "index": n}``."""
    if isinstance(image, Mapping):
        return {"job": str(image["job"]), "index": int(image.get("index", 0))}
    if isinstance(image, str) and image.startswith("data:"):
        return image
    data = Path(image).read_bytes() if isinstance(image, (str, os.PathLike)) else bytes(image)
    return f"data:{image_media_type(data)};base64,{base64.b64encode(data).decode('ascii')}"


def open_file(file: FileArg, default_name: str) -> tuple[str, IO[bytes] | bytes, bool]:
    """(file name, content, whether the caller must close it) for a multipart part."""
    if isinstance(file, bytes):
        return default_name, file, False
    if isinstance(file, (str, os.PathLike)):
        path = Path(file)
        return path.name, open(path, "rb"), True
    return Path(getattr(file, "name", default_name)).name, file, False


def finetune_form(adapter_name: str, dataset_name: str | None, recipe: Mapping[str, Any] | None, replace: bool,
                  webhook: str | None, webhook_events: Sequence[str] | None) -> dict[str, str]:
    form = {"adapter_name": adapter_name, "recipe": json.dumps(dict(recipe or {}))}
    if dataset_name is not None:
        form["dataset_name"] = dataset_name
    if replace:
        form["replace"] = "true"
    if webhook is not None:
        form["webhook"] = webhook
    if webhook_events is not None:
        form["webhook_events"] = ",".join(webhook_events)
    return form


def adapter_form(name: str, description: str, base_adapter: str | None, replace: bool) -> dict[str, str]:
    form = {"name": name, "description": description}
    if base_adapter is not None:
        form["base_adapter"] = base_adapter
    if replace:
        form["replace"] = "true"
    return form
