"""Fixtures for fault, hostile-input and load tests: a Redis that can crash and come back with its
data, workers with resource limits, and a way to see every file written under a directory."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import REDIS_SERVER, REPO_ROOT, ApiServer, WorkerProcess, free_port, wait_for_port

SMALL = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2, "seed": 7}
# Seconds of work on the tiny model: long enough to be caught in the middle.
LONG = {"prompt": "a slow one", "width": 256, "height": 256, "steps": 100, "seed": 2, "num_images": 4}


class DurableRedis:
    """A redis-server configured like production (AOF, noeviction) that a test may kill and restart
    on the same port and data directory."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", "--maxmemory-policy", "noeviction", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def crash(self) -> None:
        """SIGKILL: no shutdown, no final save; only what reached the append-only file survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class LimitedWorker(WorkerProcess):
    """``python -m worker`` with a cap on the size of any file it writes: a write past the cap fails
    with EFBIG mid-file, as a full disk fails with ENOSPC. Works as root, needs no mount."""

    def __init__(self, env: dict[str, str], args: list[str], log_path: Path, max_file_bytes: int):
        self.log_path = log_path
        self.log = open(log_path, "wb")

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
            # Python ignores SIGXFSZ already; be explicit so the write returns an error instead of killing.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *args], cwd=REPO_ROOT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=limit,
        )


class LimitedApiServer(ApiServer):
    """The API under uvicorn with a cap on the size of any file it writes (a full disk, as for
    LimitedWorker): temp spools, staged uploads and stored objects all hit it."""

    def __init__(self, env: dict[str, str], log_path: Path, max_file_bytes: int):
        self.port = free_port()
        self.log = open(log_path, "wb")
        self.log_path = log_path

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            cwd=REPO_ROOT, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=limit,
        )
        wait_for_port(self.port, 30)


def files_under(root: Path) -> set[str]:
    """Every file and link below ``root`` (relative paths)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not after {timeout_s} s")


def wait_progress(http: Any, job_id: str, step: int = 2, timeout_s: float = 60) -> None:
    """Until the job has made ``step`` denoising steps."""

    def moved() -> bool:
        progress = http.get(f"/jobs/{job_id}").json()["progress"]
        return bool(progress and progress["stage"] == "denoise" and progress["step"] >= step)

    wait_until(moved, timeout_s, f"job {job_id} at step {step}", 0.02)
