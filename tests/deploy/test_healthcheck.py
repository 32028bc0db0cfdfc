"""The containers' healthcheck script, run for real against a running stack."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT, free_port
from tests.deploy.conftest import ServedStack

SCRIPT = str(REPO_ROOT / "docker" / "healthcheck.py")


def healthcheck(*args: str, redis_url: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "URAE_REDIS_URL": redis_url}
    return subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=30)


def test_api_check_follows_the_health_route(served_stack: ServedStack) -> None:
    assert healthcheck("api", f"{served_stack.base_url}/health").returncode == 0
    down = healthcheck("api", f"http://127.0.0.1:{free_port()}/health")
    assert down.returncode == 1 and down.stderr.startswith("unhealthy: ")


def test_worker_check_needs_a_live_heartbeat(served_stack: ServedStack) -> None:
    assert healthcheck("worker", "local-gen-", redis_url=served_stack.redis_url).returncode == 0
    assert healthcheck("worker", "local-finetune-", redis_url=served_stack.redis_url).returncode == 0
    absent = healthcheck("worker", "worker-gpu7-", redis_url=served_stack.redis_url)
    assert absent.returncode == 1 and "no live worker named worker-gpu7-*" in absent.stderr
    no_redis = healthcheck("worker", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert no_redis.returncode == 1 and "Redis unavailable" in no_redis.stderr


def test_usage_errors_exit_2() -> None:
    assert healthcheck().returncode == 2
    assert healthcheck("database").returncode == 2
