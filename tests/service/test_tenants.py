"""Keys are tenants: each sees and manages only what it created; admin keys see everything; per-key
limits on waiting jobs and stored bytes; datasets can be listed and deleted."""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from jobstore.adapters import register_adapter
from jobstore.contract import job_key
from jobstore.datasets import get_dataset, sweep_unused_datasets
from jobstore.jobs import JobRecords
from jobstore.settings import hash_api_key
from jobstore.storage import LocalStorage
from jobstore.usage import usage
from service.app import create_app
from service.auth import key_id_of
from tests.conftest import make_settings
from tests.worker.test_finetune_flow import RECIPE, dataset_zip

KEYS = {"a": "tenant-a-key", "b": "tenant-b-key", "root": "root-admin-key"}
GENERATE = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}


def owner(name: str) -> str:
    return key_id_of(hash_api_key(KEYS[name]))


@pytest.fixture(scope="module")
def tenant_settings(service_env: dict[str, str]) -> Any:
    return make_settings(service_env, api_keys=f"{KEYS['a']},{KEYS['b']}", admin_keys=KEYS["root"],
                         max_queued_jobs_per_key=3, storage_quota_bytes=0)


class As:
    """One started app, called with one tenant's key."""

    def __init__(self, client: TestClient, key: str):
        self.client = client
        self.auth = {"Authorization": f"Bearer {key}"}

    def get(self, url: str, **kw: Any) -> Any:
        return self.client.get(url, headers={**self.auth, **kw.pop("headers", {})}, **kw)

    def post(self, url: str, **kw: Any) -> Any:
        return self.client.post(url, headers={**self.auth, **kw.pop("headers", {})}, **kw)

    def delete(self, url: str, **kw: Any) -> Any:
        return self.client.delete(url, headers={**self.auth, **kw.pop("headers", {})}, **kw)


@pytest.fixture(scope="module")
def clients(tenant_settings: Any) -> Iterator[dict[str, As]]:
    with TestClient(create_app(tenant_settings)) as client:
        yield {name: As(client, key) for name, key in KEYS.items()}


@pytest.fixture()
def conn(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def _clear_queues(conn: redis.Redis) -> None:
    for key in conn.scan_iter(match="rq:queue:*"):
        conn.delete(key)
    for key in conn.scan_iter(match="urae:owner:*"):
        conn.delete(key)


def test_another_keys_job_is_not_found_and_an_admin_sees_it(clients: dict[str, As], conn: redis.Redis) -> None:
    _clear_queues(conn)
    a, b, root = clients["a"], clients["b"], clients["root"]
    job = a.post("/generate", json=GENERATE)
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    for response in (b.get(f"/jobs/{job_id}"), b.get(f"/jobs/{job_id}/events"), b.get(f"/jobs/{job_id}/images/0"),
                     b.delete(f"/jobs/{job_id}")):
        assert response.status_code == 404, response.text
        assert response.json()["detail"] == f"job {job_id} not found"
    assert a.get(f"/jobs/{job_id}").json()["status"] == "queued"  # B's cancel did nothing
    assert root.get(f"/jobs/{job_id}").status_code == 200
    assert root.delete(f"/jobs/{job_id}").json()["status"] == "canceled"


def test_another_keys_adapter_is_invisible_unusable_and_its_name_taken(
    clients: dict[str, As], conn: redis.Redis
) -> None:
    _clear_queues(conn)
    a, b, root = clients["a"], clients["b"], clients["root"]
    register_adapter(conn, {"name": "a-style", "version": "v1", "object": "adapters/a-style/v1.safetensors",
                            "rank": 4, "size_bytes": 10, "source": "upload", "owner": owner("a")})
    assert "a-style" in [x["name"] for x in a.get("/adapters").json()["adapters"]]
    assert "a-style" not in [x["name"] for x in b.get("/adapters").json()["adapters"]]
    assert "urae-2k" in [x["name"] for x in b.get("/adapters").json()["adapters"]]  # built-ins: everyone
    assert b.get("/adapters/a-style").status_code == 404
    assert b.delete("/adapters/a-style").status_code == 404
    used = b.post("/generate", json={**GENERATE, "adapters": [{"name": "a-style"}]})
    assert used.status_code == 422 and used.json()["field"] == "adapters[0].name"
    assert a.post("/generate", json={**GENERATE, "adapters": [{"name": "a-style"}]}).status_code == 202
    taken = b.post("/adapters", files={"file": ("x.safetensors", b"12345678", "application/octet-stream")},
                   data={"name": "a-style", "replace": "true"})
    assert taken.status_code == 409 and "taken" in taken.json()["detail"]
    assert "a-style" in [x["name"] for x in root.get("/adapters").json()["adapters"]]
    assert root.get("/adapters/a-style").status_code == 200


def test_a_generate_job_records_the_adapter_versions_it_was_submitted_with(
    clients: dict[str, As], conn: redis.Redis, tenant_settings: Any
) -> None:
    _clear_queues(conn)
    response = clients["a"].post("/generate", json={**GENERATE, "adapters": [{"name": "a-style"}, {"name": "urae-2k"}]})
    assert response.status_code == 202, response.text
    payload = JobRecords(conn).get(response.json()["id"])["payload"]
    assert payload["adapter_versions"] == {"a-style": "v1"}


def test_per_key_limit_on_waiting_jobs(clients: dict[str, As], conn: redis.Redis) -> None:
    _clear_queues(conn)
    a, b = clients["a"], clients["b"]
    for _ in range(3):
        assert a.post("/generate", json=GENERATE).status_code == 202
    refused = a.post("/generate", json=GENERATE)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
    assert "URAE_MAX_QUEUED_JOBS_PER_KEY" in refused.json()["detail"]
    assert b.post("/generate", json=GENERATE).status_code == 202  # another key is not held back
    # A canceled job no longer counts.
    waiting = [m.decode() for m in conn.smembers(f"urae:owner:{owner('a')}:jobs")]
    assert a.delete(f"/jobs/{waiting[0]}").status_code == 200
    assert waiting[0].encode() not in conn.smembers(f"urae:owner:{owner('a')}:jobs")  # ended: forgotten at once
    assert a.post("/generate", json=GENERATE).status_code == 202


def test_an_idempotency_key_that_outlived_its_job_gets_a_clear_409(clients: dict[str, As], conn: redis.Redis) -> None:
    _clear_queues(conn)
    a = clients["a"]
    first = a.post("/generate", json=GENERATE, headers={"Idempotency-Key": "retry-1"})
    assert first.status_code == 202
    assert a.post("/generate", json=GENERATE, headers={"Idempotency-Key": "retry-1"}).json()["id"] == first.json()["id"]
    conn.delete(job_key(first.json()["id"]))  # the record expired (result TTL shorter than the key's)
    again = a.post("/generate", json=GENERATE, headers={"Idempotency-Key": "retry-1"})
    assert again.status_code == 409, again.text
    assert "expired" in again.json()["detail"] and again.json()["field"] == "Idempotency-Key"
    # The same key from another tenant is another key.
    assert clients["b"].post("/generate", json=GENERATE, headers={"Idempotency-Key": "retry-1"}).status_code == 202


def _finetune(client: As, adapter: str, dataset: str, upload: bool = True, **data: str) -> Any:
    files = {"dataset": ("d.zip", dataset_zip(), "application/zip")} if upload else None
    return client.post("/finetune", files=files, data={"adapter_name": adapter, "dataset_name": dataset,
                                                        "recipe": json.dumps({**RECIPE, "steps": 2}), **data})


def test_datasets_are_listed_per_key_and_deleted_only_when_no_job_needs_them(
    clients: dict[str, As], conn: redis.Redis, service_env: dict[str, str]
) -> None:
    _clear_queues(conn)
    a, b, root = clients["a"], clients["b"], clients["root"]
    used_before = usage(conn, owner("a"))
    job = _finetune(a, "a-tuned", "a-pets")
    assert job.status_code == 202, job.text
    listed = a.get("/datasets").json()["datasets"]
    (pets,) = [d for d in listed if d["name"] == "a-pets"]
    assert pets["files"] == 6 and pets["images"] == 3 and pets["size_bytes"] > 0 and pets["last_used_at"]
    assert usage(conn, owner("a")) == used_before + pets["size_bytes"]
    assert "a-pets" not in [d["name"] for d in b.get("/datasets").json()["datasets"]]
    assert b.get("/datasets/a-pets").status_code == 404
    assert b.delete("/datasets/a-pets").status_code == 404
    assert _finetune(b, "b-tuned", "a-pets", upload=False).status_code == 404  # B cannot train on it
    assert root.get("/datasets/a-pets").status_code == 200

    busy = a.delete("/datasets/a-pets")
    assert busy.status_code == 409 and job.json()["id"] in busy.json()["detail"]
    assert a.delete(f"/jobs/{job.json()['id']}").status_code == 200
    assert a.delete("/datasets/a-pets").status_code == 204
    assert a.get("/datasets/a-pets").status_code == 404
    assert not (Path(service_env["URAE_STORAGE_DIR"]) / "datasets" / "a-pets").exists()
    assert usage(conn, owner("a")) == used_before


def test_finetune_onto_an_existing_adapter_name_needs_replace(clients: dict[str, As], conn: redis.Redis) -> None:
    _clear_queues(conn)
    a, b = clients["a"], clients["b"]
    refused = _finetune(a, "a-style", "a-set-1")
    assert refused.status_code == 409 and "replace=true" in refused.json()["detail"]
    assert refused.json()["field"] == "adapter_name"
    assert _finetune(a, "a-style", "a-set-1", replace="true").status_code == 202
    assert _finetune(b, "a-style", "b-set-1", replace="true").status_code == 409  # not B's to replace


def test_unused_datasets_expire_and_free_their_bytes(
    clients: dict[str, As], conn: redis.Redis, tenant_settings: Any
) -> None:
    _clear_queues(conn)
    a = clients["a"]
    assert _finetune(a, "a-old", "a-old-set").status_code == 202
    storage = LocalStorage(tenant_settings.storage_dir)
    used = usage(conn, owner("a"))
    size = get_dataset(conn, "a-old-set")["size_bytes"]
    # A queued job still needs it: kept, however old.
    assert "a-old-set" not in sweep_unused_datasets(conn, storage, 0.001)
    _clear_queues(conn)
    for job_id in [m.decode() for m in conn.smembers("urae:dataset:a-old-set:jobs")]:
        JobRecords(conn).request_cancel(job_id)
    time.sleep(0.01)
    assert sweep_unused_datasets(conn, storage, 3600) == []  # used moments ago
    assert "a-old-set" in sweep_unused_datasets(conn, storage, 0.001)
    assert get_dataset(conn, "a-old-set") is None and not storage.path("datasets/a-old-set").exists()
    assert usage(conn, owner("a")) == used - size


def test_uploads_over_the_storage_quota_are_refused_before_anything_is_stored(
    service_env: dict[str, str], conn: redis.Redis
) -> None:
    settings = make_settings(service_env, api_keys=KEYS["b"], storage_quota_bytes=20_000)
    storage = Path(service_env["URAE_STORAGE_DIR"])
    conn.hset("urae:usage", owner("b"), 0)
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {KEYS['b']}"}) as b:
        # Refused from the Content-Length alone: the key has 1000 bytes left.
        conn.hset("urae:usage", owner("b"), 19_000)
        archive = dataset_zip(count=6)
        assert len(archive) > 1000
        response = b.post("/finetune", files={"dataset": ("d.zip", archive, "application/zip")},
                          data={"adapter_name": "b-big", "dataset_name": "b-big-set", "recipe": json.dumps(RECIPE)})
        assert response.status_code == 413, response.text
        assert "storage quota" in response.json()["detail"] and response.json()["field"] == "dataset"
        # A small archive that expands beyond what is left: cut while it is extracted.
        conn.hset("urae:usage", owner("b"), 0)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bomb, zipfile.ZipFile(io.BytesIO(archive)) as src:
            bomb.writestr("img0.png", src.read("pets/img0.png"))
            bomb.writestr("img0.txt", "a stripe pattern " * 3000)
        assert len(buffer.getvalue()) < 5_000
        response = b.post("/finetune", files={"dataset": ("d.zip", buffer.getvalue(), "application/zip")},
                          data={"adapter_name": "b-big", "dataset_name": "b-big-set", "recipe": json.dumps(RECIPE)})
        assert response.status_code == 413, response.text
        assert "storage quota" in response.json()["detail"]
        assert not (storage / "datasets" / "b-big-set").exists()
        leftovers = [p for p in storage.rglob("*") if p.is_file() and "b-big" in str(p) or p.name.startswith(".tmp")]
        assert leftovers == []
        adapter = b.post("/adapters", files={"file": ("x.safetensors", b"\0" * 30_000, "application/octet-stream")},
                         data={"name": "b-big"})
        assert adapter.status_code == 413 and "storage quota" in adapter.json()["detail"]
        # A key whose quota is used up (by images, say) makes no new images either.
        conn.hset("urae:usage", owner("b"), 20_000)
        full = b.post("/generate", json=GENERATE)
        assert full.status_code == 413 and "storage quota" in full.json()["detail"]
    conn.hset("urae:usage", owner("b"), 0)
    assert not any((storage / "uploads").glob("*")) if (storage / "uploads").exists() else True
