"""Webhooks end to end: the real API, a real generation worker, the real webhook worker, and a real
HTTP receiver on 127.0.0.1 that checks signatures with the standardwebhooks package."""

from __future__ import annotations

import base64
import json
import os
import socket
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


OTHER_KEY = "webhooks-second-key-777"
SENDERS, SENDERS_PER_KEY = 3, 2


@pytest.fixture(scope="module")
def service_env(service_env: dict[str, str]) -> dict[str, str]:
    """The shared settings plus webhooks: loopback receivers allowed explicitly, short backoff, a second
    API key, three senders of which one key may use two."""
    return {
        **service_env,
        "URAE_API_KEYS": f"{service_env['URAE_API_KEYS']},{OTHER_KEY}",
        "URAE_WEBHOOK_CONCURRENCY": str(SENDERS),
        "URAE_WEBHOOK_CONCURRENCY_PER_KEY": str(SENDERS_PER_KEY),
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


class DrippingReceiver:
    """Answers every request with a status line, then one more header byte every ``interval_s``, never
    finishing: each byte arrives well within any read timeout."""

    def __init__(self, interval_s: float = 0.3):
        self.interval_s = interval_s
        self.server = socket.create_server(("127.0.0.1", 0))
        self.requests: list[float] = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.getsockname()[1]}{path}"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                self.requests.append(time.time())
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                while not self.stop.is_set():
                    time.sleep(self.interval_s)
                    conn.sendall(b"z")
            except OSError:
                pass  # the sender gave up

    def close(self) -> None:
        self.stop.set()
        self.server.close()


@pytest.fixture(scope="module")
def dripping() -> Iterator[DrippingReceiver]:
    d = DrippingReceiver()
    yield d
    d.close()


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
        proc.log_path = log_path  # type: ignore[attr-defined]
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
    # Exponential backoff: 0.25 s, then 0.5 s. Each retry is sent no earlier than its wait after the
    # attempt before it was recorded: the sender's own clock (one process) shows it, however slow the
    # machine; how much later it comes depends on the load, so there is no upper bound.
    assert [a["next_attempt_in_s"] for a in attempts[:2]] == [0.25, 0.5]
    for before, after in zip(attempts, attempts[1:], strict=False):
        assert after["at"] - before["at"] >= before["next_attempt_in_s"] - 0.01, attempts
    # The receiver saw the three deliveries in that order, each answered as scripted.
    assert [r["at"] for r in requests] == sorted(r["at"] for r in requests)


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


def test_credentials_in_a_webhook_url_never_come_back(http: httpx.Client, api_server: Any, receiver: Receiver,
                                                      worker: Any, webhook_worker: Any) -> None:
    """User info and query values of a webhook URL are used to deliver and shown nowhere: not in the
    submit answer, the job, its events, its recorded attempts, nor any log line."""
    password, token, user = "pa55-w0rd-s3cret", "tok-9f8e7d6c-s3cret", "hook-user-s3cret"
    path = f"/creds?token={token}&plain=visible-value"
    url = receiver.url(path).replace("http://", f"http://{user}:{password}@")
    with receiver.lock:
        receiver.scripts[path] = [(500, 0.0)]  # one failed attempt on record, then delivered
    submitted = http.post("/generate", json={**SMALL, "webhook": url, "webhook_events": ["started", "completed"]})
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    assert submitted.json()["webhook"]["url"] == receiver.url("/creds?token=***&plain=***").replace("http://", "http://***@")
    wait_for_status(http, job_id)
    requests = receiver.wait(path, 3)
    # The receiver got what the URL says, credentials included.
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    assert all(r["headers"]["Authorization"] == expected for r in requests)
    attempts_when(http, job_id, lambda a: sum(x["outcome"] == "delivered" for x in a) == 2)
    shown = [submitted.text, http.get(f"/jobs/{job_id}").text, http.get(f"/jobs/{job_id}/events").text,
             webhook_worker.log_path.read_text(), api_server.log_path.read_text()]
    for secret in (password, token, user):
        for where, text in zip(["submit answer", "job", "events", "webhook log", "API log"], shown, strict=True):
            assert secret not in text, (secret, where)
    assert "webhook started of job" in shown[3]  # the worker does log each attempt


def test_a_dripping_receiver_is_cut_at_the_time_limit_recorded_and_retried(
        http: httpx.Client, dripping: DrippingReceiver, worker: Any, webhook_worker: Any) -> None:
    """httpx's timeout bounds each read; a byte every 0.3 s never trips it. The attempt's deadline
    (URAE_WEBHOOK_TIMEOUT_S=1) does: the attempt fails, is recorded, and is retried."""
    job_id = http.post("/generate", json={**SMALL, "webhook": dripping.url("/drip")}).json()["id"]
    ended_at = wait_for_status(http, job_id)["ended_at"]
    attempts = attempts_when(http, job_id, lambda a: len(a) >= 2, timeout_s=15)
    # The second attempt is retried too unless URAE_WEBHOOK_RETRY_FOR_S ran out meanwhile (a loaded machine).
    assert attempts[0]["outcome"] == "retrying" and attempts[1]["outcome"] in ("retrying", "gave_up"), attempts
    assert all(a["error"] == "no answer within 1 s" and a["status_code"] is None for a in attempts[:2])
    # Each attempt ended at its deadline: the first is recorded about 1 s after the job's end.
    assert attempts[0]["at"] - ended_at < 1 + 3, attempts[0]["at"] - ended_at
    given_up = attempts_when(http, job_id, lambda a: bool(a) and a[-1]["outcome"] == "gave_up",
                             timeout_s=RETRY_FOR_S + 15)
    assert given_up[-1]["at"] - ended_at <= RETRY_FOR_S + 3


def test_one_keys_slow_receivers_do_not_delay_another_keys_webhooks(
        http: httpx.Client, api_server: Any, receiver: Receiver, dripping: DrippingReceiver, worker: Any,
        webhook_worker: Any) -> None:
    """Key A's deliveries to a receiver that never answers occupy at most URAE_WEBHOOK_CONCURRENCY_PER_KEY
    of the worker's senders; key B's webhook is sent at once meanwhile."""
    a_jobs = [http.post("/generate", json={**SMALL, "seed": i, "webhook": dripping.url(f"/a{i}")}).json()["id"]
              for i in range(6)]
    for job_id in a_jobs:
        wait_for_status(http, job_id)
    with httpx.Client(base_url=api_server.url, headers={"Authorization": f"Bearer {OTHER_KEY}"}, timeout=30) as b:
        b_job = b.post("/generate", json={**SMALL, "seed": 99, "webhook": receiver.url("/key-b")}).json()["id"]
        b_ended = wait_for_status(b, b_job)["ended_at"]
    [delivered] = receiver.wait("/key-b", 1, timeout_s=30)
    waited = delivered["at"] - b_ended
    pending = sum(1 for job_id in a_jobs
                  if not any(x["outcome"] == "gave_up" for x in http.get(f"/jobs/{job_id}").json()["webhooks"]))
    print(f"key B's webhook sent {waited:.2f} s after its job ended; {pending} of key A's 6 still retrying")
    assert waited < 2.0
    assert pending > 0  # A's backlog was still there: B did not just wait for it to clear


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
