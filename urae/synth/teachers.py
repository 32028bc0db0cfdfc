"""Teachers: models that generate the training images (URAE guideline 1: synthetic teacher data).

``BflTeacher`` calls the Black Forest Labs API (FLUX1.1 [pro] ultra, the paper's teacher) over HTTP;
``LocalTeacher`` runs any model and adapters this library loads. Both return encoded image bytes.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from urae.errors import InvalidSpecError, TeacherError

BFL_BASE_URL = "https://api.bfl.ai"
BFL_KEY_ENV = "BFL_API_KEY"
BFL_ULTRA = "flux-pro-1.1-ultra"
# Statuses of a BFL task (GET /v1/get_result).
READY = "Ready"
PENDING_STATUSES = ("Pending", "Queued", "Processing")
MODERATED_STATUSES = ("Request Moderated", "Content Moderated")
RETRY_STATUS_CODES = (429, 500, 502, 503, 504)


@dataclass(frozen=True)
class TeacherImage:
    data: bytes  # the encoded image file
    suffix: str  # ".png", ".jpg", ...


class TeacherModerated(TeacherError):
    """The teacher refused the prompt or its output (content moderation); retrying will not help."""


class Teacher(Protocol):
    name: str

    def settings(self) -> dict[str, Any]:
        """The settings recorded in the dataset manifest (never secrets)."""
        ...

    def generate(self, prompt: str, seed: int) -> TeacherImage:
        """One image for ``prompt``; raises TeacherError (TeacherModerated when refused)."""
        ...


@dataclass
class RetryPolicy:
    """Bounded exponential backoff for 429 and 5xx answers and connection errors."""

    max_retries: int = 6  # retries after the first attempt
    initial_delay_s: float = 1.0
    max_delay_s: float = 60.0

    def delay(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based); a Retry-After header wins."""
        if retry_after is not None:
            try:
                return min(self.max_delay_s, max(0.0, float(retry_after)))
            except ValueError:
                pass  # an HTTP date: fall back to the exponential delay
        return min(self.max_delay_s, self.initial_delay_s * 2**attempt)


class BflTeacher:
    """FLUX1.1 [pro] ultra through the BFL API: submit, poll until Ready, download the signed URL.

    The API key comes from ``api_key`` or the ``BFL_API_KEY`` environment variable. The httpx client
    is shared by the synthesis threads (httpx clients are thread-safe).
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str = BFL_BASE_URL,
        model: str = BFL_ULTRA,
        aspect_ratio: str = "1:1",
        output_format: str = "png",
        raw: bool = False,
        retry: RetryPolicy | None = None,
        poll_interval_s: float = 1.0,
        task_timeout_s: float = 600.0,
        request_timeout_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        key = api_key or os.environ.get(BFL_KEY_ENV)
        if not key:
            raise InvalidSpecError(BFL_KEY_ENV, "is not set; the BFL teacher needs an API key")
        if output_format not in ("png", "jpeg"):
            raise InvalidSpecError("output_format", f"{output_format!r} is not one of png, jpeg")
        self.name = f"bfl:{model}"
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.aspect_ratio = aspect_ratio
        self.output_format = output_format
        self.raw = raw
        self.retry = retry or RetryPolicy()
        self.poll_interval_s = poll_interval_s
        self.task_timeout_s = task_timeout_s
        self._sleep = sleep
        self._client = httpx.Client(timeout=request_timeout_s, headers={"x-key": key, "accept": "application/json"})
        # Samples are signed URLs on a storage host: they must never receive the API key.
        self._download_client = httpx.Client(timeout=request_timeout_s, follow_redirects=True)

    def settings(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "model": self.model,
            "aspect_ratio": self.aspect_ratio,
            "output_format": self.output_format,
            "raw": self.raw,
        }

    def close(self) -> None:
        self._client.close()
        self._download_client.close()

    def generate(self, prompt: str, seed: int) -> TeacherImage:
        body = {
            "prompt": prompt,
            "aspect_ratio": self.aspect_ratio,
            "seed": seed,
            "output_format": self.output_format,
            "raw": self.raw,
        }
        submitted = self._json(self._request("POST", f"{self.base_url}/v1/{self.model}", json=body))
        task_id = submitted.get("id")
        if not isinstance(task_id, str):
            raise TeacherError(f"the BFL API answered a submission without a task id: {submitted!r}")
        polling_url = submitted.get("polling_url") or f"{self.base_url}/v1/get_result?id={task_id}"
        sample_url = self._wait_until_ready(task_id, polling_url)
        response = self._request("GET", sample_url, client=self._download_client)
        suffix = ".jpg" if self.output_format == "jpeg" else ".png"
        return TeacherImage(response.content, suffix)

    def _wait_until_ready(self, task_id: str, polling_url: str) -> str:
        deadline = time.monotonic() + self.task_timeout_s
        while True:
            result = self._json(self._request("GET", polling_url))
            status = result.get("status")
            if status == READY:
                sample = (result.get("result") or {}).get("sample")
                if not isinstance(sample, str):
                    raise TeacherError(f"task {task_id} is Ready but has no result.sample")
                return sample
            if status in MODERATED_STATUSES:
                raise TeacherModerated(f"task {task_id}: {status}")
            if status not in PENDING_STATUSES:
                raise TeacherError(f"task {task_id}: status {status!r}")
            if time.monotonic() > deadline:
                raise TeacherError(f"task {task_id} still {status} after {self.task_timeout_s:.0f} s")
            self._sleep(self.poll_interval_s)

    def _request(self, method: str, url: str, client: httpx.Client | None = None, **kwargs: Any) -> httpx.Response:
        """One HTTP call with bounded retries on 429, 5xx and connection errors."""
        client = client or self._client
        problem = ""
        for attempt in range(self.retry.max_retries + 1):
            retry_after = None
            try:
                response = client.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                problem = f"{exc.__class__.__name__}: {exc}"
            else:
                if response.status_code not in RETRY_STATUS_CODES:
                    if response.status_code >= 400:
                        raise TeacherError(f"{method} {_short(url)} answered {response.status_code}: {_detail(response)}")
                    return response
                problem = f"{response.status_code}: {_detail(response)}"
                retry_after = response.headers.get("retry-after")
            if attempt < self.retry.max_retries:
                self._sleep(self.retry.delay(attempt, retry_after))
        raise TeacherError(f"{method} {_short(url)} failed after {self.retry.max_retries + 1} attempts ({problem})")

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            raise TeacherError(f"the BFL API answered non-JSON: {response.text[:200]!r}") from None
        if not isinstance(data, dict):
            raise TeacherError(f"the BFL API answered {data!r}")
        return data


def _short(url: str) -> str:
    return url.split("?", 1)[0]


def _detail(response: httpx.Response) -> str:
    return " ".join(response.text.split())[:200] or response.reason_phrase


class LocalTeacher:
    """A model this library loads (with its adapters) as the teacher; PNG output."""

    def __init__(
        self,
        model_id: str,
        preset: str = "2k",
        aspect_ratio: str = "1:1",
        adapters: tuple[str, ...] = (),
        device: str = "cpu",
        dtype: str = "bfloat16",
        offload: str | None = None,
        overrides: dict[str, Any] | None = None,
    ):
        from urae.generate import Generator
        from urae.models import is_schnell

        self.name = f"local:{model_id}"
        self.model_id = model_id
        self.preset = preset
        self.aspect_ratio = aspect_ratio
        self.adapters = adapters
        self.overrides = dict(overrides or {})
        self._generator = Generator.load(model_id, device=device, dtype=dtype, offload=offload)
        self._schnell = is_schnell(self._generator.pipe)
        self.spec_for("check", 0)  # bad settings fail before any prompt is run

    def spec_for(self, prompt: str, seed: int) -> Any:
        from urae.presets import resolve_spec
        from urae.spec import AdapterRef

        return resolve_spec(
            prompt,
            self.preset,
            schnell=self._schnell,
            aspect_ratio=self.aspect_ratio,
            adapters=[AdapterRef.parse(a) for a in self.adapters],
            seed=seed,
            model=self.model_id,
            **self.overrides,
        )

    def settings(self) -> dict[str, Any]:
        spec = self.spec_for("settings", 0).to_dict()
        for key in ("prompt", "seed"):
            spec.pop(key, None)
        return {"model_id": self.model_id, "spec": spec}

    def generate(self, prompt: str, seed: int) -> TeacherImage:
        result = self._generator.generate(self.spec_for(prompt, seed))
        buffer = io.BytesIO()
        result.images[0].save(buffer, format="PNG")
        return TeacherImage(buffer.getvalue(), ".png")
