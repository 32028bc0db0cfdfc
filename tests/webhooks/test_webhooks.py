"""Webhooks end to end: the real API, a real generation worker, the real webhook worker, and a real
HTTP receiver on 127.0.0.1 that checks signatures with the standardwebhooks package."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from tests.conftest import REPO_ROOT, make_settings, wait_for_status

SECRET = "whsec_" + base64.b64encode(b"urae-serve test webhook secret!!").decode()
RETRY_FOR_S = 4.0
SMALL = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 2, "seed": 1}


@pytest.fixture(scope="module")
def service_env(service_env: dict[str, str]) -> dict[str, str]:
    """The shared settings plus webhooks: loopback receivers allowed explicitly, short backoff."""
    return {
        **service_env,
        "URAE_WEBHOOK_SECRET": SECRET,
        "URAE_WEBHOOK_ALLOW_HOSTS": "127.0.0.0/8",
        "URAE_WEBHOOK_TIMEOUT_S": "1",
        "URAE_WEBHOOK_BACKOFF_S": "0.25",
        "URAE_WEBHOOK_BACKOFF_MAX_S": "1",
        "URAE_WEBHOOK_RETRY_FOR_S": str(RETRY_FOR_S),
        "URAE_WEBHOOK_PROGRESS_INTERVAL_S": "0.2",
    }


class Receiver:
    """An HTTP server that records every request and answers each path from its own script of
    (status, delay) pairs, then with its default (200 at once unless set): a late delivery to one
    test's path never uses up another test's answers."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.scripts: dict[str, list[tuple[int, float]]] = {}
        self.defaults: dict[str, tuple[int, float]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.lock:
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers.items()),
                                              "body": body, "at": time.time()})
                    script = receiver.scripts.get(self.path)
                    status, delay = script.pop(0) if script else receiver.defaults.get(self.path, (200, 0.0))
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("content-length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the sender gave up waiting

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def received(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def wait(self, path: str, count: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.received(path)
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise TimeoutError(f"{path}: {len(self.received(path))} of {count} deliveries after {timeout_s} s")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def webhook_worker(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    log_path: Path = tmp_path_factory.mktemp("webhooks") / "webhooks.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "webhooks", "--name", "webhooks-test"], cwd=REPO_ROOT,
                                env={**os.environ, **service_env, "PYTHONUNBUFFERED": "1"},
                                stdout=log, stderr=subprocess.STDOUT)
        yield proc
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def worker(start_worker: Any) -> Any:
    return start_worker("gen-webhooks", "--queues", "generate")


def verified(request: dict[str, Any]) -> dict[str, Any]:
    """The payload, after standardwebhooks verified the signature (it raises otherwise)."""
    return Webhook(SECRET).verify(request["body"], request["headers"])  # type: ignore[no-any-return]


def attempts_when(http: httpx.Client, job_id: str, done: Any, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    attempts: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        attempts = http.get(f"/jobs/{job_id}").json()["webhooks"]
        if done(attempts):
            return attempts
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id}: webhook attempts {attempts}")


def test_completed_event_is_signed_and_verifies(http: httpx.Client, receiver: Receiver, worker: Any,
                                                webhook_worker: Any) -> None:
    response = http.post("/generate", json={**SMALL, "webhook": receiver.url("/done")})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.json()["webhook"] == {"url": receiver.url("/done"), "events": ["completed", "failed", "canceled"]}
    assert wait_for_status(http, job_id)["status"] == "finished"

    [request] = receiver.wait("/done", 1)
    payload = verified(request)
    assert payload["type"] == "job.completed"
    assert payload["data"]["id"] == job_id and payload["data"]["status"] == "finished"
    assert payload["data"]["result"]["images"][0]["url"] == f"/jobs/{job_id}/images/0"
    assert request["headers"]["webhook-signature"].startswith("v1,")
    # A wrong secret does not verify.
    with pytest.raises(Exception, match="(?i)signature"):
        Webhook("whsec_" + base64.b64encode(b"another secret of 32 bytes long!").decode()).verify(
            request["body"], request["headers"])

    [attempt] = attempts_when(http, job_id, lambda a: len(a) == 1)
    assert attempt["event"] == "completed" and attempt["attempt"] == 1
    assert attempt["status_code"] == 200 and attempt["outcome"] == "delivered" and attempt["error"] is None


def test_chosen_events_started_progress_completed(http: httpx.Client, receiver: Receiver, worker: Any,
                                                  webhook_worker: Any) -> None:
    body = {**SMALL, "steps": 30, "width": 128, "height": 128, "webhook": receiver.url("/all"),
            "webhook_events": ["started", "progress", "completed"]}
    job_id = http.post("/generate", json=body).json()["id"]
    assert wait_for_status(http, job_id)["status"] == "finished"
    requests = receiver.wait("/all", 3)
    time.sleep(1.0)  # any late progress deliveries
    types = [verified(r)["type"] for r in receiver.received("/all")]
    assert types.count("job.started") == 1 and types.count("job.completed") == 1
    progress = [verified(r)["data"] for r in receiver.received("/all") if verified(r)["type"] == "job.progress"]
    # Throttled: some progress, far fewer than the 30+ progress events of the job.
    assert 1 <= len(progress) < 30 and all("step" in p["progress"] for p in progress)
    assert len({r["headers"]["webhook-id"] for r in requests}) == len(requests)


def test_retries_after_500s_then_delivers(http: httpx.Client, receiver: Receiver, worker: Any,
                                          webhook_worker: Any) -> None:
    with receiver.lock:
        receiver.scripts["/flaky"] = [(500, 0.0), (503, 0.0)]
    job_id = http.post("/generate", json={**SMALL, "webhook": receiver.url("/flaky")}).json()["id"]
    requests = receiver.wait("/flaky", 3)
    assert len({r["headers"]["webhook-id"] for r in requests}) == 1  # one message, retried
    assert all(verified(r)["type"] == "job.completed" for r in requests)
    attempts = attempts_when(http, job_id, lambda a: any(x["outcome"] == "delivered" for x in a))
    assert [(a["attempt"], a["status_code"], a["outcome"]) for a in attempts] == [
        (1, 500, "retrying"), (2, 503, "retrying"), (3, 200, "delivered")]
    assert "500" in attempts[0]["error"]
    # Exponential backoff: 0.25 s, then 0.5 s (RQ's scheduler starts them on its next 1 s tick at most).
    assert [a["next_attempt_in_s"] for a in attempts[:2]] == [0.25, 0.5]
    gaps = [b["at"] - a["at"] for a, b in zip(requests, requests[1:], strict=False)]
    assert gaps[0] >= 0.25 - 0.05 and gaps[1] >= 0.5 - 0.05, gaps


def test_gives_up_within_the_bounded_time_and_records_it(http: httpx.Client, receiver: Receiver, worker: Any,
                                                          webhook_worker: Any) -> None:
    with receiver.lock:
        receiver.defaults["/down"] = (500, 0.0)
    job_id = http.post("/generate", json={**SMALL, "webhook": receiver.url("/down")}).json()["id"]
    ended_at = wait_for_status(http, job_id)["ended_at"]
    attempts = attempts_when(http, job_id, lambda a: bool(a) and a[-1]["outcome"] == "gave_up",
                             timeout_s=RETRY_FOR_S + 15)
    assert attempts[-1]["at"] - ended_at <= RETRY_FOR_S + 3
    assert all(a["outcome"] == "retrying" for a in attempts[:-1]) and 3 <= len(attempts) <= 10
    time.sleep(2.0)
    assert len(receiver.received("/down")) == len(attempts)  # nothing after giving up


def test_slow_receiver_blocks_neither_the_api_nor_the_worker(http: httpx.Client, receiver: Receiver, worker: Any,
                                                             webhook_worker: Any) -> None:
    with receiver.lock:
        receiver.defaults["/slow"] = (200, 6.0)  # far past URAE_WEBHOOK_TIMEOUT_S=1
    baseline_id = http.post("/generate", json=SMALL).json()["id"]
    baseline = wait_for_status(http, baseline_id)
    started = time.monotonic()
    response = http.post("/generate", json={**SMALL, "webhook": receiver.url("/slow"),
                                            "webhook_events": ["started", "progress", "completed"]})
    assert time.monotonic() - started < 2.0
    job_id = response.json()["id"]
    job = wait_for_status(http, job_id, timeout_s=30)
    assert job["status"] == "finished"
    # The job took about as long as one without a webhook, far less than one slow delivery.
    assert job["ended_at"] - job["started_at"] < (baseline["ended_at"] - baseline["started_at"]) + 2.0
    assert http.get("/health").status_code == 200
    receiver.wait("/slow", 1)
    attempts = attempts_when(http, job_id, lambda a: bool(a))
    assert "no answer within" in attempts[0]["error"] and attempts[0]["outcome"] == "retrying"


@pytest.mark.parametrize("url", [
    "http://10.1.2.3/hook", "http://169.254.169.254/latest/meta-data", "http://[::1]:9/x", "http://0.0.0.0/",
    "http://224.0.0.1/", "ftp://example.com/x", "file:///etc/passwd", "http://no-such-host.invalid/",
])
def test_private_reserved_and_non_http_urls_are_refused(client: Any, url: str) -> None:
    response = client.post("/generate", json={**SMALL, "webhook": url})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "webhook"


def test_finetune_refuses_a_private_webhook_and_unknown_events(client: Any) -> None:
    form = {"adapter_name": "hooked", "dataset_name": "nothing-here", "webhook": "http://192.168.1.10/x"}
    response = client.post("/finetune", data=form)
    assert response.status_code == 422 and response.json()["field"] == "webhook", response.text
    response = client.post("/finetune", data={**form, "webhook": "http://127.0.0.1:9/x", "webhook_events": "done"})
    assert response.status_code == 422 and response.json()["field"] == "webhook_events", response.text
    response = client.post("/generate", json={**SMALL, "webhook_events": ["completed"]})
    assert response.status_code == 422 and response.json()["field"] == "webhook_events"


def test_without_a_secret_webhooks_are_refused(service_env: dict[str, str]) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.conftest import auth

    settings = make_settings(service_env, webhook_secret="")
    with TestClient(create_app(settings), headers=auth()) as c:
        response = c.post("/generate", json={**SMALL, "webhook": "http://127.0.0.1:9/x"})
    assert response.status_code == 422 and "URAE_WEBHOOK_SECRET" in response.json()["detail"]


def test_delivery_checks_the_address_again(service_env: dict[str, str], receiver: Receiver) -> None:
    """An address allowed at submit but not at delivery (DNS rebinding, or the settings changed) is
    never connected to."""
    from webhooks.delivery import send

    strict = make_settings(service_env, webhook_allow_hosts="")
    outcome = send(strict, receiver.url("/rebound"), "msg_test", json.dumps({"type": "job.completed"}))
    assert outcome.status_code is None and outcome.retry is False and "refused" in (outcome.error or "")
    time.sleep(0.2)
    assert receiver.received("/rebound") == []


def test_secret_must_be_a_standard_webhooks_secret(service_env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="whsec_"):
        make_settings(service_env, webhook_secret="not-a-secret")
    with pytest.raises(ValueError, match="base64"):
        make_settings(service_env, webhook_secret="whsec_***")
