"""``urae-serve`` stacks (their own Redis given by URL) shared by the deploy tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from tests.conftest import RedisServer, free_port
from tests.deploy.stack_process import StackProcess, wait_ready


@dataclass
class ServedStack:
    base_url: str
    api_key: str
    redis_url: str
    process: StackProcess


@contextmanager
def serve_stack(tmp_path_factory: pytest.TempPathFactory, args: list[str],
                env: dict[str, str] | None = None) -> Iterator[ServedStack]:
    """Redis started here and passed by URL (as on a host that already runs one), the API, workers."""
    redis = RedisServer(tmp_path_factory.mktemp("deploy-redis"))
    port = free_port()
    stack = StackProcess(["--port", str(port), "--data-dir", str(tmp_path_factory.mktemp("deploy-data")),
                          "--redis-url", redis.url, *args], env=env)
    try:
        stack.wait_for_line("urae-serve: ready")
        served = ServedStack(f"http://127.0.0.1:{port}", stack.api_key(), redis.url, stack)
        wait_ready(served.base_url, served.api_key)
        yield served
    finally:
        stack.interrupt()
        stack.kill()
        redis.stop()


@pytest.fixture(scope="session")
def served_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedStack]:
    # The random tiny model (urae-serve's CPU default is mini): what the README's walkthrough and the
    # playground tests are written for.
    with serve_stack(tmp_path_factory, ["--finetune-workers", "1", "--model", "tiny"]) as served:
        yield served
