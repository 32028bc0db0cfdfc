"""GET /config: the live workers' devices decide the suggested first-image settings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from jobstore.contract import worker_key


@pytest.fixture()
def heartbeat(redis_url: str) -> Iterator[Any]:
    conn = redis.Redis.from_url(redis_url)
    names: list[str] = []

    def beat(name: str, device: str) -> None:
        record = {"name": name, "model": "tiny", "device": device, "kinds": ["generate"],
                  "max_pixels": 2048 * 2048, "tiers": ["quality"]}
        conn.set(worker_key(name), json.dumps(record), px=60_000)
        conn.sadd("urae:workers", name)
        names.append(name)

    yield beat
    for name in names:
        conn.delete(worker_key(name))
        conn.srem("urae:workers", name)


def test_cpu_workers_get_a_small_quick_first_image(client: Any, heartbeat: Any) -> None:
    heartbeat("cpu-box", "cpu")
    config = client.get("/config").json()
    assert config["devices"] == ["cpu"] and config["model"] == "tiny" and config["max_pixels"] == 2048 * 2048
    assert {k: config["suggested"][k] for k in ("width", "height", "steps", "preset")} == \
        {"width": 512, "height": 512, "steps": 4, "preset": None}
    # The suggestion is a valid request as it stands.
    body = {k: v for k, v in config["suggested"].items() if v is not None and k != "reason"}
    accepted = client.post("/generate", json={"prompt": "a fox", **body})
    assert accepted.status_code == 202, accepted.text
    client.delete(f"/jobs/{accepted.json()['id']}")


def test_gpu_workers_get_the_2k_preset(client: Any, heartbeat: Any) -> None:
    heartbeat("gpu-box", "cuda:0")
    suggested = client.get("/config").json()["suggested"]
    assert suggested["preset"] == "2k" and suggested["width"] is None and suggested["steps"] is None


def test_one_cpu_worker_among_gpus_decides(client: Any, heartbeat: Any) -> None:
    heartbeat("gpu-box", "cuda")
    heartbeat("cpu-box", "cpu")
    assert client.get("/config").json()["suggested"]["width"] == 512


def test_config_needs_the_key(client: Any) -> None:
    assert client.get("/config", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_a_small_trained_model_gets_its_base_preset_even_on_a_cpu() -> None:
    from service.routers.config import suggest

    # mini's 1k preset is 128 px at its own steps; 512 px at 4 steps would be 4x its size, unadapted.
    suggested = suggest(["cpu"], "mini")
    assert (suggested.preset, suggested.width, suggested.steps) == ("1k", None, None)
    assert suggest(["cpu"], "tiny").width == 512
