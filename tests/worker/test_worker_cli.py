"""The worker's command line refuses what it cannot serve with one readable line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--queues", "generat"], "unknown queue 'generat'"),
        (["--queues", "generate,finetune"], "needs its own worker process"),
        (["--queues", ","], "names no queue"),
    ],
)
def test_bad_queue_flags_are_refused(args: list[str], words: str) -> None:
    env = {**os.environ, "URAE_API_KEYS": "k"}
    result = subprocess.run([sys.executable, "-m", "worker", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert words in result.stderr
    assert "Traceback" not in result.stderr


def test_a_worker_is_seen_only_after_its_warm_up(start_worker: Any, service_env: dict[str, str]) -> None:
    import redis as redis_lib

    from jobstore.contract import worker_key

    conn = redis_lib.Redis.from_url(service_env["URAE_REDIS_URL"])
    # The 1k preset in both tiers (1024 px: the only preset within this worker's size).
    worker = start_worker("warm-1", "--queues", "generate", wait=False,
                          env={"URAE_WARMUP": "presets", "URAE_WORKER_MAX_PIXELS": str(1024 * 1024)})
    deadline = time.monotonic() + 240
    while not conn.exists(worker_key("warm-1")):
        # Not advertised (so not counted by /ready or admission) while it warms up.
        assert worker.proc.poll() is None, worker.output()
        assert time.monotonic() < deadline, worker.output()
        time.sleep(0.05)
    log = worker.output()
    assert "warm-up 1k 1024x1024 quality" in log and "warm-up 1k 1024x1024 turbo" in log
    assert "warm-up: 2 runs" in log
    record = json.loads(conn.get(worker_key("warm-1")))
    assert record["tiers"] == ["quality", "turbo"] and record["adapter_slots"] == 2


def test_a_worker_asked_for_a_tier_its_device_lacks_refuses_to_start(service_env: dict[str, str]) -> None:
    env = {**os.environ, **service_env, "URAE_TIERS": "fast,turbo"}
    result = subprocess.run([sys.executable, "-m", "worker", "--queues", "generate", "--burst"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "cannot load model tiny" in result.stderr and "compute capability >= 8.9" in result.stderr
    assert "Traceback" not in result.stderr
