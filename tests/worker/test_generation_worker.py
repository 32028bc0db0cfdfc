"""A real generation worker process (tiny model) behind the API on a real uvicorn socket."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import pytest
from PIL import Image

from tests.conftest import wait_for_status

SMALL = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "steps": 2, "seed": 1}
# Long enough on the tiny model to keep the worker busy while other requests arrive; tests cancel it
# once it has served its purpose, so a busy machine does not have to wait for it.
LONG = {"prompt": "a slow one", "width": 128, "height": 128, "steps": 100, "seed": 2}


@pytest.fixture(scope="module")
def worker(start_worker: Any) -> Any:
    return start_worker("gen-1", "--queues", "generate")


def sse_events(http: Any, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    name = ""
    with http.stream("GET", f"/jobs/{job_id}/events", timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_submit_stream_finish_and_fetch_the_image(http: Any, worker: Any) -> None:
    response = http.post("/generate", json={**SMALL, "width": 128, "height": 64, "steps": 3})
    assert response.status_code == 202
    job_id = response.json()["id"]

    events = sse_events(http, job_id)
    statuses = [e["status"] for name, e in events if name == "status"]
    assert statuses[0] == "queued" and statuses[-1] == "finished"
    assert "started" in statuses
    steps = [e["step"] for name, e in events if name == "progress" and e["stage"] == "denoise"]
    assert steps == sorted(steps) and steps[-1] == 3 and len(set(steps)) >= 3

    job = http.get(f"/jobs/{job_id}").json()
    assert job["status"] == "finished"
    assert set(job["timings"]) >= {"queued", "text_encode", "denoise", "decode", "write"}
    assert job["links"]["images"] == [f"/jobs/{job_id}/images/0"]

    image_response = http.get(job["links"]["images"][0])
    assert image_response.status_code == 200
    assert image_response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(image_response.content))
    assert image.size == (128, 64)
    metadata = json.loads(image.info["urae"])
    assert metadata["prompt"] == SMALL["prompt"] and metadata["seed"] == 1 and metadata["steps"] == 3
    assert http.get(f"/jobs/{job_id}/images/1").status_code == 404


def test_a_seed_past_2_53_survives_a_javascript_json_round_trip(http: Any, worker: Any) -> None:
    """A JSON client whose numbers are doubles (JavaScript) reads seed_str exactly, sends it back as a
    string, and gets the same image."""
    seed = "9130118860406938186"
    assert float(seed) != int(seed)  # what JavaScript's JSON.parse makes of the number: 9130118860406939000

    def as_javascript_reads_it(job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(http.get(f"/jobs/{job_id}").text, parse_int=float)["result"]
        return result

    first = http.post("/generate", json={**SMALL, "seed": seed, "num_images": 2})
    assert first.status_code == 202, first.text
    assert wait_for_status(http, first.json()["id"])["result"]["seed"] == int(seed)
    result = as_javascript_reads_it(first.json()["id"])
    assert result["seed_str"] == seed
    assert [image["seed_str"] for image in result["images"]] == [seed, str(int(seed) + 1)]
    assert result["seed"] != int(seed)  # the number alone would not have survived

    again = http.post("/generate", json={**SMALL, "seed": result["images"][1]["seed_str"]}).json()["id"]
    assert as_javascript_reads_it(wait_for_status(http, again)["id"])["seed_str"] == str(int(seed) + 1)
    images = [Image.open(io.BytesIO(http.get(f"/jobs/{job}/images/{i}").content)).convert("RGB")
              for job, i in ((first.json()["id"], 1), (again, 0))]
    assert max(abs(a - b) for a, b in zip(images[0].tobytes(), images[1].tobytes(), strict=True)) <= 1

    for bad in ("9223372036854775808", "12a", "-1", "1e3"):
        response = http.post("/generate", json={**SMALL, "seed": bad})
        assert response.status_code == 422 and response.json()["field"] == "seed", (bad, response.text)


def test_several_images_in_webp(http: Any, worker: Any) -> None:
    job_id = http.post("/generate", json={**SMALL, "num_images": 2, "output_format": "webp"}).json()["id"]
    job = wait_for_status(http, job_id)
    assert job["status"] == "finished", job
    first = http.get(f"/jobs/{job_id}/images/0")
    second = http.get(f"/jobs/{job_id}/images/1")
    assert first.headers["content-type"] == second.headers["content-type"] == "image/webp"
    assert first.content != second.content  # seeds seed and seed + 1
    assert Image.open(io.BytesIO(second.content)).size == (64, 64)


def test_priorities_and_cancel_of_a_queued_job(http: Any, worker: Any) -> None:
    blocker = http.post("/generate", json=LONG).json()["id"]
    wait_for_status(http, blocker, ("started",))
    low = http.post("/generate", json={**SMALL, "priority": "low"}).json()["id"]
    normal = http.post("/generate", json=SMALL).json()["id"]
    doomed = http.post("/generate", json=SMALL).json()["id"]
    high = http.post("/generate", json={**SMALL, "priority": "high"}).json()
    assert high["queue_position"] == 0
    assert http.get(f"/jobs/{low}").json()["queue_position"] == 3

    canceled = http.delete(f"/jobs/{doomed}")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert http.get(f"/jobs/{blocker}").json()["status"] == "started", "the blocker ended too early"
    http.delete(f"/jobs/{blocker}")

    jobs = {name: wait_for_status(http, job_id) for name, job_id in
            [("low", low), ("normal", normal), ("high", high["id"])]}
    assert all(j["status"] == "finished" for j in jobs.values()), jobs
    assert jobs["high"]["started_at"] < jobs["normal"]["started_at"] < jobs["low"]["started_at"]
    never_ran = http.get(f"/jobs/{doomed}").json()
    assert never_ran["status"] == "canceled" and never_ran["started_at"] is None


def test_cancel_a_running_job_stops_before_decode(http: Any, worker: Any) -> None:
    job_id = http.post("/generate", json=LONG).json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = http.get(f"/jobs/{job_id}").json()
        if job["progress"] and job["progress"]["stage"] == "denoise" and job["progress"]["step"] >= 2:
            break
        time.sleep(0.02)
    response = http.delete(f"/jobs/{job_id}")
    assert response.status_code == 202
    events = sse_events(http, job_id)
    assert events[-1][1]["status"] == "canceled"
    assert not any(e.get("stage") == "decode" for _, e in events)
    job = http.get(f"/jobs/{job_id}").json()
    assert job["status"] == "canceled"
    assert job["progress"]["step"] < job["progress"]["total"]
    assert job["links"]["images"] == []
    assert http.get(f"/jobs/{job_id}/images/0").status_code == 409


def test_output_write_failure_fails_the_job_and_the_worker_keeps_serving(
    http: Any, worker: Any, service_env: dict[str, str]
) -> None:
    from pathlib import Path

    jobs_dir = Path(service_env["URAE_STORAGE_DIR"]) / "jobs"
    backup = jobs_dir.with_name("jobs-kept")
    jobs_dir.mkdir(parents=True, exist_ok=True)  # also when no job has written anything yet
    jobs_dir.rename(backup)
    jobs_dir.write_text("not a directory")  # every image write now fails
    try:
        job = wait_for_status(http, http.post("/generate", json=SMALL).json()["id"])
    finally:
        jobs_dir.unlink()
        backup.rename(jobs_dir)
    assert job["status"] == "failed"
    assert "cannot write" in job["error"]
    after = wait_for_status(http, http.post("/generate", json=SMALL).json()["id"])
    assert after["status"] == "finished"


def test_ready_and_metrics_report_the_worker(http: Any, worker: Any) -> None:
    for _ in range(4):
        assert wait_for_status(http, http.post("/generate", json=SMALL).json()["id"])["status"] == "finished"
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["live_workers"] == 1
    text = http.get("/metrics").text
    assert 'urae_live_workers{kind="generate"} 1' in text
    finished = next(line for line in text.splitlines() if line.startswith('urae_jobs_total{status="finished"}'))
    assert int(finished.split()[-1]) >= 4
    count = next(line for line in text.splitlines() if line.startswith('urae_stage_duration_seconds_count{stage="denoise"}'))
    assert int(count.split()[-1]) >= 4
    assert 'urae_queue_depth{queue="urae-generate-normal"} 0' in text


def test_tiers_the_worker_serves_run_and_are_recorded_others_are_refused(http: Any, worker: Any) -> None:
    # The CPU worker advertises quality and turbo (no fp8 here) and the kernel it chose at load.
    ready = http.get("/ready").json()
    assert ready["tiers"] == ["quality", "turbo"]
    assert ready["workers"][0]["attention_backend"] == "native" and ready["workers"][0]["compiled"] is False
    assert ready["workers"][0]["memory_profile"] == "default"
    refused = http.post("/generate", json={**SMALL, "tier": "fast"})
    assert refused.status_code == 422 and refused.json()["field"] == "tier"
    job = wait_for_status(http, http.post("/generate", json={**SMALL, "tier": "turbo"}).json()["id"])
    assert job["status"] == "finished", job
    assert job["result"]["tier"] == "turbo" and job["result"]["attention_backend"] == "native"
    metadata = json.loads(Image.open(io.BytesIO(http.get(job["links"]["images"][0]).content)).info["urae"])
    assert metadata["tier"] == "turbo" and metadata["step_cache"]["kind"] == "first_block"


def test_a_job_over_its_time_limit_fails_with_the_reason(settings: Any, http: Any, worker: Any) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.conftest import API_KEY

    impatient = settings.model_copy(update={"job_timeout_s": 1})
    with TestClient(create_app(impatient), headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        job = wait_for_status(client, client.post("/generate", json={**LONG, "num_images": 4}).json()["id"])
    assert job["status"] == "failed"
    assert job["error"] == "timed out after 1 s"
    assert wait_for_status(http, http.post("/generate", json=SMALL).json()["id"])["status"] == "finished"


def test_a_reconnecting_event_stream_continues_after_last_event_id(http: Any, worker: Any) -> None:
    job_id = http.post("/generate", json=SMALL).json()["id"]
    assert wait_for_status(http, job_id)["status"] == "finished"
    ids = [line.removeprefix("id: ") for line in http.get(f"/jobs/{job_id}/events").text.splitlines()
           if line.startswith("id: ")]
    assert len(ids) >= 4
    rest = http.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": ids[-3]}).text
    assert [line.removeprefix("id: ") for line in rest.splitlines() if line.startswith("id: ")] == ids[-2:]
    assert '"status": "finished"' in rest
