"""The blocking client: ``Client`` and the ``Job`` handles it returns."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from urae_client import wire
from urae_client.errors import UraeError
from urae_client.models import Adapter, Dataset, Event, EventStreamParser, JobState

EventCallback = Callable[[Event], None]


class Job:
    """A job on the server. ``state`` is the last one seen; ``refresh()`` asks again."""

    def __init__(self, client: Client, state: JobState) -> None:
        self._client = client
        self.state = state

    @property
    def id(self) -> str:
        return self.state.id

    @property
    def status(self) -> str:
        return self.state.status

    def __repr__(self) -> str:
        return f"Job({self.id!r}, {self.status!r})"

    def refresh(self) -> Job:
        self.state = JobState.from_json(self._client._json("GET", f"/jobs/{self.id}"))
        return self

    def cancel(self) -> Job:
        """Cancel: a queued job never runs; a running one stops at its next step."""
        self.state = JobState.from_json(self._client._json("DELETE", f"/jobs/{self.id}"))
        return self

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The job's events (status, progress, preview) from its creation until it ends.

        A dropped connection, or the server's ``event: reconnect`` while it restarts, is followed by a
        reconnection with ``Last-Event-ID``: no event is repeated or lost (previews: the latest one).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last_id: str | None = None
        attempt = 0
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            read_s = wire.EVENT_READ_TIMEOUT_S if deadline is None else max(0.5, min(
                wire.EVENT_READ_TIMEOUT_S, deadline - time.monotonic()))
            try:
                with self._client._http.stream(
                    "GET", f"/jobs/{self.id}/events", headers=headers, timeout=httpx.Timeout(30.0, read=read_s),
                ) as response:
                    if not response.is_success:
                        response.read()
                        wire.raise_for_answer(response)
                    parser = EventStreamParser()
                    received = 0
                    for line in response.iter_lines():
                        _check_deadline(deadline, self)
                        event = parser.feed(line)
                        if event is None:
                            continue
                        attempt = 0
                        received += 1
                        if event.type in ("reconnect", "error"):
                            break  # the server asks to come back (shutdown) or lost its event store
                        if event.id:
                            last_id = event.id
                        yield event
                        if event.terminal:
                            self.refresh()
                            return
                # The stream ended without the terminal event: reconnect, and the server replays what
                # came after the last event seen. Only a stream that closed with nothing to replay means
                # the job's last event was already seen (a resume after it closes at once).
                if received == 0 and self.refresh().state.done:
                    return
            except httpx.TransportError:
                pass  # dropped connection or the server restarting: reconnect below
            _check_deadline(deadline, self)
            time.sleep(wire.RECONNECT_DELAYS_S[min(attempt, len(wire.RECONNECT_DELAYS_S) - 1)])
            attempt += 1

    def wait(self, progress_callback: EventCallback | None = None, timeout: float | None = None,
             preview_callback: EventCallback | None = None) -> Job:
        """Follow the job's events until it ends; returns the job in its final state (check ``status``).

        ``progress_callback`` gets every progress event (``event.progress``: stage, step, total),
        ``preview_callback`` every preview (``event.image``: JPEG bytes). Raises UraeError after
        ``timeout`` seconds.
        """
        for event in self.events(timeout=timeout):
            if event.type == "progress" and progress_callback is not None:
                progress_callback(event)
            elif event.type == "preview" and preview_callback is not None:
                preview_callback(event)
        return self

    def download(self, index: int = 0, path: str | Path | None = None) -> bytes:
        """Image ``index`` of a finished job (written to ``path`` too when given)."""
        content = self._client._request("GET", f"/jobs/{self.id}/images/{index}", follow_redirects=True).content
        if path is not None:
            Path(path).write_bytes(content)
        return content


def _check_deadline(deadline: float | None, job: Job) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise UraeError(f"job {job.id} had not ended when the wait timed out (last seen: {job.status})")


class Client:
    """A blocking client of one urae-serve API. ``api_key`` defaults to $URAE_API_KEY, ``base_url``
    to $URAE_API_URL or http://127.0.0.1:8000."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=wire.base_url_from(base_url), timeout=timeout, transport=transport,
                                  headers=wire.headers_for(wire.api_key_from(api_key)))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------------
    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise wire.transport_error(exc, f"{method} {url}") from exc
        wire.raise_for_answer(response)
        return response

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        return self._request(method, url, **kwargs).json()

    # -- service ------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return dict(self._json("GET", "/health"))

    def ready(self) -> dict[str, Any]:
        """The readiness report; a server that is not ready answers it too (``status: not ready``)."""
        try:
            response = self._http.get("/ready")
        except httpx.TransportError as exc:
            raise wire.transport_error(exc, "GET /ready") from exc
        if response.status_code != 503:
            wire.raise_for_answer(response)
        return dict(response.json())

    def config(self) -> dict[str, Any]:
        """What the live workers serve and the settings suggested for a first image (``suggested``)."""
        return dict(self._json("GET", "/config"))

    # -- jobs ---------------------------------------------------------------------------------------
    def generate(self, prompt: str, *, preset: str | None = None, aspect_ratio: str | None = None,
                 width: int | None = None, height: int | None = None, steps: int | None = None,
                 guidance: float | None = None, seed: int | None = None, num_images: int | None = None,
                 adapters: Sequence[wire.AdapterArg] | None = None, tier: str | None = None,
                 output_format: str | None = None, priority: str | None = None, preview_every: int | None = None,
                 webhook: str | None = None, webhook_events: Sequence[str] | None = None,
                 idempotency_key: str | None = None, image: wire.ImageArg | None = None,
                 strength: float | None = None) -> Job:
        """Queue a text-to-image job, or with ``image`` an image-to-image one (bytes or a path are sent
        as a data: URL; ``{"job": id, "index": n}`` names an image of one of your finished jobs).
        Options left out take the server's defaults."""
        body = wire.generate_body(prompt, dict(
            preset=preset, aspect_ratio=aspect_ratio, width=width, height=height, steps=steps, guidance=guidance,
            seed=seed, num_images=num_images, adapters=adapters, tier=tier, output_format=output_format,
            priority=priority, preview_every=preview_every, webhook=webhook,
            webhook_events=list(webhook_events) if webhook_events is not None else None, image=image,
            strength=strength))
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return Job(self, JobState.from_json(self._json("POST", "/generate", json=body, headers=headers)))

    def refine(self, job_id: str, *, preset: str | None = None, width: int | None = None, height: int | None = None,
               strength: float | None = None, index: int | None = None, tier: str | None = None,
               output_format: str | None = None, priority: str | None = None, preview_every: int | None = None,
               webhook: str | None = None, webhook_events: Sequence[str] | None = None,
               idempotency_key: str | None = None) -> Job:
        """Make image ``index`` of a finished job again at a target size (``preset``, keeping its aspect
        ratio, or ``width`` and ``height``): its prompt, seed and adapters, image to image from it."""
        body = wire.refine_body(dict(
            preset=preset, width=width, height=height, strength=strength, index=index, tier=tier,
            output_format=output_format, priority=priority, preview_every=preview_every, webhook=webhook,
            webhook_events=list(webhook_events) if webhook_events is not None else None))
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return Job(self, JobState.from_json(self._json("POST", f"/jobs/{job_id}/refine", json=body, headers=headers)))

    def job(self, job_id: str) -> Job:
        return Job(self, JobState.from_json(self._json("GET", f"/jobs/{job_id}")))

    def finetune(self, adapter_name: str, *, dataset: wire.FileArg | None = None, dataset_name: str | None = None,
                 recipe: Mapping[str, Any] | None = None, replace: bool = False, webhook: str | None = None,
                 webhook_events: Sequence[str] | None = None) -> Job:
        """Queue a fine-tune on an archive (``dataset``: a path, bytes or a binary file) or on a dataset
        already on the server (``dataset_name`` alone)."""
        form = wire.finetune_form(adapter_name, dataset_name, recipe, replace, webhook, webhook_events)
        if dataset is None:
            return Job(self, JobState.from_json(self._json("POST", "/finetune", data=form)))
        name, content, owned = wire.open_file(dataset, "dataset.zip")
        try:
            answer = self._json("POST", "/finetune", data=form, files={"dataset": (name, content)})
        finally:
            if owned and not isinstance(content, bytes):
                content.close()
        return Job(self, JobState.from_json(answer))

    # -- adapters -----------------------------------------------------------------------------------
    def adapters(self) -> list[Adapter]:
        return [Adapter.from_json(a) for a in self._json("GET", "/adapters")["adapters"]]

    def adapter(self, name: str) -> Adapter:
        return Adapter.from_json(self._json("GET", f"/adapters/{name}"))

    def upload_adapter(self, name: str, file: wire.FileArg, *, description: str = "",
                       base_adapter: str | None = None, replace: bool = False,
                       timeout: float | None = 600.0) -> Adapter:
        """Upload a .safetensors adapter and return it once a worker has checked and registered it."""
        filename, content, owned = wire.open_file(file, f"{name}.safetensors")
        try:
            response = self._request("POST", "/adapters", data=wire.adapter_form(name, description, base_adapter, replace),
                                     files={"file": (filename, content, "application/octet-stream")})
        finally:
            if owned and not isinstance(content, bytes):
                content.close()
        if response.status_code == 201:
            return Adapter.from_json(response.json())
        job = Job(self, JobState.from_json(response.json())).wait(timeout=timeout)
        if job.status != "finished":
            raise UraeError(job.state.error or f"the adapter import ended {job.status}", status=422, field="file")
        return self.adapter(name)

    def delete_adapter(self, name: str) -> None:
        self._request("DELETE", f"/adapters/{name}")

    # -- datasets -----------------------------------------------------------------------------------
    def datasets(self) -> list[Dataset]:
        return [Dataset.from_json(d) for d in self._json("GET", "/datasets")["datasets"]]

    def dataset(self, name: str) -> Dataset:
        return Dataset.from_json(self._json("GET", f"/datasets/{name}"))

    def delete_dataset(self, name: str) -> None:
        self._request("DELETE", f"/datasets/{name}")
