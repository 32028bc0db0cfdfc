"""Validation, authentication, admission and idempotency: the API with a real Redis and no worker."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from jobstore.contract import generate_queue, worker_key
from jobstore.queues import rq_queue_key
from tests.conftest import API_KEY, make_settings

SMALL = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 2}


def test_health_needs_no_key(client: Any) -> None:
    response = client.get("/health", headers={"Authorization": ""})
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic " + API_KEY, "Bearer "])
@pytest.mark.parametrize("route", [("POST", "/generate"), ("GET", "/adapters"), ("GET", "/metrics"), ("GET", "/ready"),
                                   ("GET", "/jobs/" + "0" * 32)])
def test_every_route_but_health_needs_a_valid_key(client: Any, header: str | None, route: tuple[str, str]) -> None:
    method, path = route
    headers = {"Authorization": header} if header is not None else {"Authorization": ""}
    response = client.request(method, path, headers=headers, json=SMALL if method == "POST" else None)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "key" in response.json()["detail"].lower() or "authorization" in response.json()["detail"].lower()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"width": 100}, "width"),
        ({"height": 8208}, "height"),
        ({"width": 8192, "height": 4096}, None),
        ({"steps": 0}, "steps"),
        ({"steps": 101}, "steps"),
        ({"guidance": 31}, "guidance"),
        ({"num_images": 5}, "num_images"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"width": None}, None),
        ({"adapters": [{"name": "../etc/passwd"}]}, "adapters[0].name"),
        ({"adapters": [{"name": "does-not-exist"}]}, "adapters[0].name"),
        ({"adapters": [{"name": "urae-2k", "weight": 9}]}, "adapters[0].weight"),
        ({"adapters": [{"name": "urae-2k"}, {"name": "x", "weight": "heavy"}]}, "adapters[1].weight"),
        ({"webhook_events": ["started", "never"]}, "webhook_events[1]"),
        ({"output_format": "gif"}, "output_format"),
        ({"priority": "urgent"}, "priority"),
        ({"preset": "8k"}, "preset"),
        ({"aspect_ratio": "7:3"}, "aspect_ratio"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_requests_get_422_naming_the_field_and_queue_nothing(
    client: Any, redis_url: str, change: dict[str, Any], field: str | None
) -> None:
    body = {**SMALL, **change}
    body = {k: v for k, v in body.items() if v is not None}
    response = client.post("/generate", json=body)
    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["detail"]
    if field is not None:
        assert answer["field"] == field
    conn = redis.Redis.from_url(redis_url)
    assert conn.llen("rq:queue:" + generate_queue("normal")) == 0


def test_a_json_syntax_error_names_the_body_and_the_position(client: Any) -> None:
    response = client.post("/generate", content=b'{"prompt": "a fox",}', headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    answer = response.json()
    assert answer["field"] == "body"
    assert answer["detail"].startswith("body: not valid JSON at byte 19")


def test_the_pixel_limit_message_predicts_acceptance(client: Any) -> None:
    """The stated maximum is the product the API enforces: 4096x4160 passes validation, 4096x4176 not."""
    for width, height in ((8192, 8192), (4096, 4176)):
        refused = client.post("/generate", json={"prompt": "a castle", "width": width, "height": height})
        assert refused.status_code == 422
        detail = refused.json()["detail"]
        assert f"{width}x{height} is {width * height:,} pixels" in detail
        assert "the maximum is 17,039,360 pixels" in detail and "4096x4160" in detail
    accepted = client.post("/generate", json={"prompt": "a castle", "width": 4096, "height": 4160})
    assert accepted.status_code == 202, accepted.text
    client.delete(f"/jobs/{accepted.json()['id']}")


def test_accepted_job_is_queued_with_position_and_links(client: Any) -> None:
    response = client.post("/generate", json={**SMALL, "seed": 3})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued"
    assert job["queue_position"] == 0
    assert job["links"]["self"] == f"/jobs/{job['id']}"
    assert response.headers["Location"] == f"/jobs/{job['id']}"
    again = client.get(job["links"]["self"]).json()
    assert again["status"] == "queued" and again["id"] == job["id"]
    second = client.post("/generate", json={**SMALL, "priority": "low"}).json()
    high = client.post("/generate", json={**SMALL, "priority": "high"}).json()
    assert high["queue_position"] == 0
    assert client.get(f"/jobs/{job['id']}").json()["queue_position"] == 1
    assert client.get(f"/jobs/{second['id']}").json()["queue_position"] == 2
    for j in (job, second, high):
        assert client.delete(f"/jobs/{j['id']}").status_code == 200


def test_idempotency_key_maps_repeats_to_one_job(client: Any) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = client.post("/generate", json=SMALL, headers=headers)
    second = client.post("/generate", json=SMALL, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    other = client.post("/generate", json=SMALL, headers={"Idempotency-Key": "order-43"})
    assert other.json()["id"] != first.json()["id"]
    changed = client.post("/generate", json={**SMALL, "seed": 9}, headers=headers)
    assert changed.status_code == 422
    assert changed.json()["field"] == "Idempotency-Key"
    for job_id in (first.json()["id"], other.json()["id"]):
        client.delete(f"/jobs/{job_id}")


def test_cancel_a_queued_job_removes_it_from_the_queue(client: Any, redis_url: str) -> None:
    job = client.post("/generate", json=SMALL).json()
    response = client.delete(f"/jobs/{job['id']}")
    assert response.status_code == 200
    assert response.json()["status"] == "canceled"
    conn = redis.Redis.from_url(redis_url)
    assert conn.llen("rq:queue:" + generate_queue("normal")) == 0
    assert client.delete(f"/jobs/{job['id']}").status_code == 409


@pytest.mark.parametrize("job_id", ["../../etc/passwd", "%2e%2e%2fsecret", "ABCDEF" * 6, "0" * 31, "é" * 32])
def test_strange_job_ids_are_refused(client: Any, job_id: str) -> None:
    response = client.get(f"/jobs/{job_id}")
    assert 400 <= response.status_code < 500
    assert response.status_code != 401


def test_unknown_job_is_404(client: Any) -> None:
    response = client.get("/jobs/" + "a" * 32)
    assert response.status_code == 404
    assert "not found" in response.json()["detail"]


def test_full_queue_answers_429_with_retry_after(settings: Any) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app

    tight = settings.model_copy(update={"max_queue_depth": 2, "retry_after_s": 7})
    with TestClient(create_app(tight), headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        body = {**SMALL, "priority": "low"}
        jobs = [c.post("/generate", json=body) for _ in range(2)]
        assert [r.status_code for r in jobs] == [202, 202]
        refused = c.post("/generate", json=body)
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "7"
        assert "full" in refused.json()["detail"]
        # Other priorities have their own queue.
        other = c.post("/generate", json={**SMALL, "priority": "high"})
        assert other.status_code == 202
        for r in (*jobs, other):
            c.delete(f"/jobs/{r.json()['id']}")


def test_size_no_live_worker_can_fit_is_refused_at_once(client: Any, redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    # A worker that says it can do at most 2K (as a heartbeat record advertises it).
    record = {"name": "small-gpu", "model": "tiny", "kinds": ["generate"], "max_pixels": 2048 * 2048}
    conn.set(worker_key("small-gpu"), json.dumps(record), px=60_000)
    conn.sadd("urae:workers", "small-gpu")
    try:
        refused = client.post("/generate", json={"prompt": "a castle", "preset": "4k"})
        assert refused.status_code == 422
        assert "larger than any live worker" in refused.json()["detail"]
        accepted = client.post("/generate", json={"prompt": "a castle", "preset": "2k"})
        assert accepted.status_code == 202
        client.delete(f"/jobs/{accepted.json()['id']}")
    finally:
        conn.delete(worker_key("small-gpu"))


def test_tier_no_live_worker_serves_is_refused_at_once(client: Any, redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    # A bf16 worker (as its heartbeat advertises it): quality and turbo, no fp8.
    record = {"name": "bf16-gpu", "model": "tiny", "kinds": ["generate"], "max_pixels": 4096 * 4096,
              "tiers": ["quality", "turbo"], "attention_backend": "_native_cudnn", "compiled": True,
              "memory_profile": "24gb"}
    conn.set(worker_key("bf16-gpu"), json.dumps(record), px=60_000)
    conn.sadd("urae:workers", "bf16-gpu")
    try:
        refused = client.post("/generate", json={"prompt": "a castle", "preset": "2k", "tier": "fast"})
        assert refused.status_code == 422
        assert refused.json()["field"] == "tier"
        assert "no live worker serves the fast tier" in refused.json()["detail"]
        assert conn.llen(rq_queue_key(generate_queue("normal"))) == 0
        ready = client.get("/ready").json()
        assert ready["tiers"] == ["quality", "turbo"]
        assert ready["workers"][0]["attention_backend"] == "_native_cudnn"
        assert ready["workers"][0]["memory_profile"] == "24gb"
        for tier in ("turbo", "quality"):
            accepted = client.post("/generate", json={"prompt": "a castle", "preset": "2k", "tier": tier})
            assert accepted.status_code == 202
            job = client.get(f"/jobs/{accepted.json()['id']}")
            assert job.status_code == 200
            client.delete(f"/jobs/{accepted.json()['id']}")
        bad = client.post("/generate", json={"prompt": "a castle", "tier": "ludicrous"})
        assert bad.status_code == 422 and bad.json()["field"] == "tier"
        # The worker mixes 2 adapters at once: 2k's own URAE adapter + 2 more is one too many.
        conn.set(worker_key("bf16-gpu"), json.dumps({**record, "adapter_slots": 2}), px=60_000)
        time.sleep(1.1)  # the API re-reads the live workers at most every second
        three = [{"name": "urae-4k"}, {"name": "urae-4k-schnell"}]
        too_many = client.post("/generate", json={"prompt": "a castle", "preset": "2k", "adapters": three})
        assert too_many.status_code == 422 and too_many.json()["field"] == "adapters", too_many.json()
        assert "at most 2" in too_many.json()["detail"]
        two = client.post("/generate", json={"prompt": "a castle", "preset": "2k", "adapters": [{"name": "urae-2k"},
                                                                                          {"name": "urae-4k"}]})
        assert two.status_code == 202
        client.delete(f"/jobs/{two.json()['id']}")
    finally:
        conn.delete(worker_key("bf16-gpu"))


def test_redis_down_answers_503_quickly(service_env: dict[str, str]) -> None:
    import time

    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.conftest import free_port

    dead = make_settings(service_env, redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_socket_timeout_s=0.5)
    with TestClient(create_app(dead), headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        start = time.monotonic()
        response = c.post("/generate", json=SMALL)
        assert response.status_code == 503
        assert "unavailable" in response.json()["detail"]
        assert time.monotonic() - start < 3
        assert c.get("/health").status_code == 200


def test_ready_without_worker_is_503_with_reason(client: Any) -> None:
    response = client.get("/ready")
    assert response.status_code == 503
    assert "no live worker" in response.json()["detail"]


def test_openapi_documents_examples(client: Any) -> None:
    schema = client.get("/openapi.json").json()
    assert "examples" in schema["components"]["schemas"]["GenerateRequest"]
    assert set(schema["paths"]) >= {"/generate", "/jobs/{job_id}", "/jobs/{job_id}/events", "/adapters", "/finetune",
                                    "/metrics", "/ready", "/health", "/jobs/{job_id}/images/{index}", "/adapters/{name}"}


def test_a_queued_finetune_answers_its_queue_position(client: Any, redis_url: str) -> None:
    from tests.worker.test_finetune_flow import RECIPE, dataset_zip

    ids = []
    for i in range(2):
        response = client.post("/finetune", files={"dataset": ("pets.zip", dataset_zip(), "application/zip")},
                               data={"adapter_name": f"queued-pets-{i}", "recipe": json.dumps(RECIPE)})
        assert response.status_code == 202, response.text
        assert response.json()["queue_position"] == i
        ids.append(response.json()["id"])
    assert [client.get(f"/jobs/{job_id}").json()["queue_position"] for job_id in ids] == [0, 1]
    # A fine-tune worker takes the first, then forks its training process before the job starts: the
    # job is out of the queue and still queued, next to run.
    from jobstore.contract import FINETUNE_QUEUE
    from jobstore.jobs import JobRecords

    records = JobRecords(redis.Redis.from_url(redis_url), 3600)
    assert records.claim_next([rq_queue_key(FINETUNE_QUEUE)], "trainer-1") == (rq_queue_key(FINETUNE_QUEUE), ids[0])
    first = client.get(f"/jobs/{ids[0]}").json()
    assert (first["status"], first["queue_position"]) == ("queued", 0)
    assert client.get(f"/jobs/{ids[1]}").json()["queue_position"] == 0
    for job_id in ids:
        assert client.delete(f"/jobs/{job_id}").status_code == 200
