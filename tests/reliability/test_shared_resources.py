"""What every key shares (Redis connections, pool threads, sockets and file descriptors, the per-key
job count) cannot be used up by one key or one client, measured against the API as deployments start
it (``urae-api``), run as under ``ulimit -n 1024``.

- Event streams hold no Redis connection while they wait: a key with more open streams than the
  old pool had connections is served, a second key is not locked out, and the caps answer 429/503
  (nothing opened) past them.
- A client gets ``URAE_HEADER_TIMEOUT_S`` to send its headers; a flood of slow or silent sockets
  never takes the file descriptors /health needs.
- Archive extraction for POST /finetune uses the upload threads only (at most 4 at once).
- The per-key limit on waiting jobs is exact under concurrent submissions.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import resource
import socket
import struct
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis

from service.limits import UPLOAD_THREADS
from tests.conftest import API_KEY
from tests.reliability.test_request_limits import MainApi
from tests.worker.test_finetune_flow import RECIPE, dataset_zip

KEY_A, KEY_B, KEY_C = API_KEY, "second-tenant-key-4242", "third-tenant-key-5353"
STREAMS_PER_KEY = 130  # more than redis-py's default pool of 100 connections
STREAMS_IN_ALL = 135
QUEUED_PER_KEY = 5
HEADER_TIMEOUT_S = 2.0
OPEN_FILES = 1024
ASYNC_REDIS_CONNECTIONS = 10


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def service_env(service_env: dict[str, str]) -> dict[str, str]:
    return {**service_env, "URAE_API_KEYS": f"{KEY_A},{KEY_B},{KEY_C}",
            "URAE_MAX_EVENT_STREAMS_PER_KEY": str(STREAMS_PER_KEY), "URAE_MAX_EVENT_STREAMS": str(STREAMS_IN_ALL),
            "URAE_MAX_QUEUED_JOBS_PER_KEY": str(QUEUED_PER_KEY), "URAE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            "URAE_ADAPTER_IMPORT_WAIT_S": "1", "URAE_SSE_KEEPALIVE_S": "30",
            "URAE_REDIS_MAX_CONNECTIONS": str(ASYNC_REDIS_CONNECTIONS)}


@pytest.fixture(scope="module")
def api(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[MainApi]:
    server = MainApi(service_env, tmp_path_factory.mktemp("shared-api"), open_files=OPEN_FILES)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def conn(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def tiny_safetensors(size: int = 4) -> bytes:
    """A valid safetensors header over ``size`` bytes of float32 zeros (the API checks only headers)."""
    n = max(1, size // 4)
    header = json.dumps({"transformer.x.lora_A.weight": {"dtype": "F32", "shape": [1, n], "data_offsets": [0, 4 * n]}})
    return struct.pack("<Q", len(header)) + header.encode() + b"\0" * (4 * n)


async def open_streams(url: str, key: str, job_id: str, count: int, opened: list[Any], done: threading.Event) -> list[Any]:
    """``count`` concurrent event streams of one job; each records its status, the first event and
    the terminal one; they stay open until the job ends (or ``done`` is set)."""
    results: list[Any] = []

    async def one(client: httpx.AsyncClient) -> None:
        seen: dict[str, Any] = {"status": None, "events": []}
        results.append(seen)
        try:
            async with client.stream("GET", f"/jobs/{job_id}/events") as response:
                seen["status"] = response.status_code
                seen["retry_after"] = response.headers.get("retry-after")
                if response.status_code != 200:
                    seen["body"] = (await response.aread()).decode()
                    opened.append(seen)
                    return
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        seen["events"].append(line.removeprefix("event: "))
                        if len(seen["events"]) == 1:
                            opened.append(seen)
                    if line.startswith("data: ") and '"canceled"' in line:
                        return
                    if done.is_set():
                        return
        except httpx.HTTPError as exc:
            seen["status"] = type(exc).__name__
            opened.append(seen)

    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, headers=auth(key), timeout=60, limits=limits) as client:
        await asyncio.gather(*(one(client) for _ in range(count)))
    return results


def api_redis_connections(conn: redis.Redis) -> int:
    """Connections to Redis from every client but this test's own."""
    return sum(1 for c in conn.client_list() if c.get("cmd") not in ("client|list", "client"))


def test_one_keys_event_streams_lock_no_other_key_out(api: MainApi, conn: redis.Redis) -> None:
    with httpx.Client(base_url=api.url, timeout=30) as http:
        job_a = http.post("/generate", json={"prompt": "watched by many", "priority": "low"}, headers=auth(KEY_A))
        job_b = http.post("/generate", json={"prompt": "B's own", "priority": "low"}, headers=auth(KEY_B))
        assert job_a.status_code == job_b.status_code == 202, (job_a.text, job_b.text)
        job_a_id, job_b_id = job_a.json()["id"], job_b.json()["id"]
        baseline = api_redis_connections(conn)

        opened: list[Any] = []
        watchers = threading.Thread(target=lambda: asyncio.run(
            open_streams(api.url, KEY_A, job_a_id, STREAMS_PER_KEY, opened, threading.Event())), daemon=True)
        watchers.start()
        deadline = time.monotonic() + 60
        while len(opened) < STREAMS_PER_KEY:
            assert time.monotonic() < deadline, f"{len(opened)} of {STREAMS_PER_KEY} streams answered"
            time.sleep(0.05)
        statuses = [s["status"] for s in opened]
        assert statuses == [200] * STREAMS_PER_KEY, {s: statuses.count(s) for s in set(statuses)}
        assert all(s["events"][:1] == ["status"] for s in opened)
        # They wait without a Redis connection each: the API holds at most its bounded pool (and the
        # one reader), not one connection per stream.
        held = api_redis_connections(conn) - baseline
        print(f"{STREAMS_PER_KEY} open streams; the API holds {held} more Redis connections than before")
        assert held <= ASYNC_REDIS_CONNECTIONS + 2, held

        # The same key past its cap: 429 with Retry-After, nothing opened.
        more = http.get(f"/jobs/{job_a_id}/events", headers=auth(KEY_A))
        assert more.status_code == 429 and more.headers["retry-after"], more.text
        assert "URAE_MAX_EVENT_STREAMS_PER_KEY" in more.json()["detail"]

        # Another key is served as if nothing happened: its stream, a submission, an upload, a read.
        with http.stream("GET", f"/jobs/{job_b_id}/events", headers=auth(KEY_B)) as stream:
            assert stream.status_code == 200
            assert next(line for line in stream.iter_lines() if line.startswith("event: ")) == "event: status"
        assert http.post("/generate", json={"prompt": "B again", "priority": "low"},
                         headers=auth(KEY_B)).status_code == 202
        upload = http.post("/adapters", files={"file": ("a.safetensors", tiny_safetensors())}, data={"name": "b-up"},
                           headers=auth(KEY_B))
        assert upload.status_code == 202, upload.text  # no worker here: the import waits, the job is given
        assert http.get(f"/jobs/{upload.json()['id']}", headers=auth(KEY_B)).status_code == 200

        # The process's own cap: B gets the streams left under it, then 503 with Retry-After.
        b_opened: list[Any] = []
        b_done = threading.Event()
        b_watchers = threading.Thread(target=lambda: asyncio.run(
            open_streams(api.url, KEY_B, job_b_id, STREAMS_IN_ALL - STREAMS_PER_KEY + 3, b_opened, b_done)),
            daemon=True)
        b_watchers.start()
        while len(b_opened) < STREAMS_IN_ALL - STREAMS_PER_KEY + 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        b_statuses = sorted(s["status"] for s in b_opened)
        assert b_statuses == [200] * (STREAMS_IN_ALL - STREAMS_PER_KEY) + [503] * 3, b_statuses
        assert all(s["retry_after"] for s in b_opened if s["status"] == 503)

        # Every one of A's streams gets the job's end, and they close.
        assert http.delete(f"/jobs/{job_a_id}", headers=auth(KEY_A)).status_code == 200
        watchers.join(timeout=30)
        assert not watchers.is_alive()
        assert all(s["events"][-1:] == ["status"] and len(s["events"]) >= 2 for s in opened)
        b_done.set()
        http.delete(f"/jobs/{job_b_id}", headers=auth(KEY_B))
        b_watchers.join(timeout=30)
        # Closed streams give their places back.
        time.sleep(0.5)
        job = http.post("/generate", json={"prompt": "after", "priority": "low"}, headers=auth(KEY_A)).json()["id"]
        with http.stream("GET", f"/jobs/{job}/events", headers=auth(KEY_A)) as stream:
            assert stream.status_code == 200
        http.delete(f"/jobs/{job}", headers=auth(KEY_A))
    assert "Traceback" not in api.output()


def test_slow_and_silent_sockets_are_cut_off_and_never_starve_health(api: MainApi) -> None:
    """Sockets that send part of a header, or nothing, are closed after the header time limit; a
    flood of them larger than the open-file limit leaves /health answering throughout."""
    # The client side needs descriptors too.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8192)), hard))
    flood = 3 * OPEN_FILES
    sockets: list[socket.socket] = []
    health: list[tuple[float, int | str]] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                code: int | str = httpx.get(f"{api.url}/health", timeout=5).status_code
            except httpx.HTTPError as exc:
                code = type(exc).__name__
            health.append((time.monotonic() - started, code))
            time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        started = time.monotonic()
        for i in range(flood):
            s = socket.create_connection(("127.0.0.1", api.port), timeout=10)
            if i % 2 == 0:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # and never the rest
            sockets.append(s)
        opened_in = time.monotonic() - started
        fds = len(os.listdir(f"/proc/{api.proc.pid}/fd"))
        time.sleep(HEADER_TIMEOUT_S + 3)
        stop.set()
        prober.join()
        # Every socket was closed by the server: at the limit (the oldest waiting one), or at the timeout.
        closed = 0
        answered_408 = 0
        for s in sockets:
            s.settimeout(0.5)
            try:
                data = s.recv(4096)
            except TimeoutError:
                continue  # still open
            except ConnectionResetError:
                data = b""
            closed += 1
            answered_408 += data.startswith(b"HTTP/1.1 408")
    finally:
        stop.set()
        for s in sockets:
            s.close()
    codes = [code for _, code in health]
    print(f"{flood} sockets opened in {opened_in:.1f} s; API held {fds} descriptors (limit {OPEN_FILES}); "
          f"{closed} closed by the server ({answered_408} with 408); /health {len(codes)} probes, "
          f"max {max(t for t, _ in health) * 1000:.0f} ms")
    assert closed == flood
    assert answered_408 > 0
    assert fds < OPEN_FILES
    assert codes and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    assert httpx.get(f"{api.url}/health", timeout=5).status_code == 200
    assert "Too many open files" not in api.output()


def big_archive(images: int = 10, image_bytes: int = 1024 * 1024) -> bytes:
    """A small zip that expands to ``images`` images of ``image_bytes`` each (a real PNG header, then
    zeros), and ends with a caption that is not UTF-8: refused after all the work, nothing stored."""
    with zipfile.ZipFile(io.BytesIO(dataset_zip())) as good:
        png = next(good.read(i) for i in good.infolist() if i.filename.endswith(".png"))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(images):
            archive.writestr(f"set/img{i}.png", png + b"\0" * (image_bytes - len(png)))
            archive.writestr(f"set/img{i}.txt", "a caption")
        archive.writestr("set/zz-last.txt", b"\xff\xfe not UTF-8")
    return buffer.getvalue()


def test_48_concurrent_finetune_uploads_use_the_upload_threads_only(api: MainApi) -> None:
    archive = big_archive()
    staging = api.storage / "uploads"
    running: list[int] = []
    latencies: list[float] = []
    sampling = threading.Event()
    sampling.set()

    def sample() -> None:
        while sampling.is_set():
            running.append(sum(1 for p in staging.glob(".tmp-*") if p.is_dir()) if staging.exists() else 0)
            time.sleep(0.005)

    def probe() -> None:
        with httpx.Client(base_url=api.url, timeout=60) as client:
            while sampling.is_set():
                t0 = time.monotonic()
                assert client.get("/health").status_code == 200
                latencies.append(time.monotonic() - t0)
                time.sleep(0.02)

    uploader = httpx.Client(base_url=api.url, headers=auth(KEY_C), timeout=300,
                            limits=httpx.Limits(max_connections=60))

    def upload(i: int) -> int:
        return uploader.post("/finetune", files={"dataset": ("d.zip", archive, "application/zip")},
                             data={"adapter_name": f"many-{i}", "dataset_name": f"many-{i}",
                                   "recipe": json.dumps(RECIPE)}).status_code

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=probe, daemon=True)]
    for t in threads:
        t.start()
    started = time.monotonic()
    with ThreadPoolExecutor(48) as pool:
        codes = list(pool.map(upload, range(48)))
    took = time.monotonic() - started
    sampling.clear()
    for t in threads:
        t.join()
    uploader.close()
    worst = max(latencies)
    print(f"48 uploads of {len(archive)} bytes (expanding to 10 MiB each) answered {sorted(set(codes))} in {took:.1f} s; "
          f"at most {max(running)} extracting at once; /health max {worst * 1000:.0f} ms over {len(latencies)} probes")
    assert codes == [422] * 48  # each refused at its last member, after all the work
    assert max(running) <= UPLOAD_THREADS
    assert worst < 2.0
    assert not any(staging.glob(".tmp-*"))


def test_the_per_key_limit_on_waiting_jobs_is_exact_under_concurrency(api: MainApi, conn: redis.Redis) -> None:
    submissions = 60
    # Uploads are checked against the limit before their file is read and stored, and queued after:
    # the widest window for concurrent submissions to pass the check together.
    upload = tiny_safetensors(256 * 1024)
    clients = [httpx.Client(base_url=api.url, headers=auth(KEY_C), timeout=60) for _ in range(submissions)]
    barrier = threading.Barrier(submissions)

    def submit(i: int) -> int:
        client = clients[i]
        barrier.wait()
        if i % 2:  # adapter imports wait in the queues too, and count
            return client.post("/adapters", files={"file": ("a.safetensors", upload)},
                               data={"name": f"race-{i}"}).status_code
        return client.post("/generate", json={"prompt": f"race {i}", "priority": "low"}).status_code

    try:
        with ThreadPoolExecutor(submissions) as pool:
            codes = list(pool.map(submit, range(submissions)))
    finally:
        for client in clients:
            client.close()
    accepted = codes.count(202)
    print(f"{submissions} concurrent submissions of one key: {accepted} accepted, {codes.count(429)} x 429")
    assert accepted == QUEUED_PER_KEY, {c: codes.count(c) for c in set(codes)}
    assert codes.count(429) == submissions - QUEUED_PER_KEY
    # No refused upload left a file behind.
    assert len(list((api.storage / "uploads").glob("*.safetensors"))) <= QUEUED_PER_KEY
