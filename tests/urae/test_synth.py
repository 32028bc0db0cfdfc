"""Synthetic teacher data: the BFL client against a local server that speaks the BFL protocol over
real HTTP (429s, 5xx, moderation, errors), resume after interruption, and a local teacher."""

from __future__ import annotations

import io
import json
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from PIL import Image

from urae.data import scan_dataset
from urae.errors import InvalidSpecError
from urae.synth import BflTeacher, RetryPolicy, synthesize

API_KEY = "test-key-123"


class FakeBfl:
    """State of the fake API. Prompts steer it: "busy" gets two 429s on submit, "flaky" a 503 on
    its first poll, "moderate" is Content Moderated, "explode" ends in status Error, and prompts in
    ``broken`` get 500 on every submit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tasks: dict[str, dict[str, Any]] = {}
        self.submits: Counter[str] = Counter()  # accepted submissions per prompt
        self.rejected: Counter[int] = Counter()  # 429/5xx answers by status code
        self.busy_left: Counter[str] = Counter()
        self.broken: set[str] = set()
        self.always_busy = False
        self.sample_requests_with_key = 0
        self.base = ""


def make_handler(state: FakeBfl) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def send_json(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def reject(self, code: int) -> None:
            with state.lock:
                state.rejected[code] += 1
            self.send_json(code, {"detail": "try later"}, {"retry-after": "0"} if code == 429 else None)

        def do_POST(self) -> None:
            if self.headers.get("x-key") != API_KEY:
                return self.send_json(403, {"detail": "Not authenticated"})
            if self.path != "/v1/flux-pro-1.1-ultra":
                return self.send_json(404, {"detail": "Not Found"})
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            prompt = body["prompt"]
            with state.lock:
                if state.always_busy:
                    busy = True
                elif "busy" in prompt and state.busy_left[prompt] < 2:
                    state.busy_left[prompt] += 1
                    busy = True
                else:
                    busy = False
            if busy:
                return self.reject(429)
            if prompt in state.broken:
                return self.reject(500)
            with state.lock:
                state.submits[prompt] += 1
                task_id = f"task{len(state.tasks)}"
                state.tasks[task_id] = {"body": body, "polls": 0}
            self.send_json(200, {"id": task_id, "polling_url": f"{state.base}/v1/get_result?id={task_id}"})

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path.startswith("/samples/"):
                if self.headers.get("x-key"):
                    state.sample_requests_with_key += 1
                task = state.tasks[url.path.rsplit("/", 1)[1].split(".")[0]]
                buffer = io.BytesIO()
                Image.new("RGB", (96, 64), (task["body"]["seed"] * 40 % 256, 10, 10)).save(buffer, format="PNG")
                data = buffer.getvalue()
                self.send_response(200)
                self.send_header("content-type", "image/png")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            if self.headers.get("x-key") != API_KEY:
                return self.send_json(403, {"detail": "Not authenticated"})
            task_id = parse_qs(url.query)["id"][0]
            if task_id not in state.tasks:
                return self.send_json(200, {"id": task_id, "status": "Task not found"})
            task = state.tasks[task_id]
            prompt = task["body"]["prompt"]
            with state.lock:
                task["polls"] += 1
                polls = task["polls"]
            if "flaky" in prompt and polls == 1:
                return self.reject(503)
            if polls < 3:
                return self.send_json(200, {"id": task_id, "status": "Pending", "result": None})
            if "moderate" in prompt:
                return self.send_json(200, {"id": task_id, "status": "Content Moderated", "result": None})
            if "explode" in prompt:
                return self.send_json(200, {"id": task_id, "status": "Error", "result": None})
            sample = f"{state.base}/samples/{task_id}.png?se=signed"
            self.send_json(200, {"id": task_id, "status": "Ready", "result": {"sample": sample, "prompt": prompt}})

    return Handler


@pytest.fixture
def bfl() -> Iterator[FakeBfl]:
    state = FakeBfl()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def teacher(state: FakeBfl, max_retries: int = 4) -> BflTeacher:
    return BflTeacher(
        api_key=API_KEY,
        base_url=state.base,
        retry=RetryPolicy(max_retries=max_retries, initial_delay_s=0.001, max_delay_s=0.01),
        poll_interval_s=0.001,
    )


def test_client_survives_429_and_5xx_and_records_moderation(bfl: FakeBfl, tmp_path: Path) -> None:
    prompts = ["a red fox in snow", "busy street at night", "flaky old barn", "please moderate this"]
    report = synthesize(prompts, tmp_path, teacher(bfl), seed=10, concurrency=3)

    assert report.done == [0, 1, 2] and report.moderated == [3] and not report.failed
    assert bfl.rejected[429] == 2 and bfl.rejected[503] == 1
    assert bfl.sample_requests_with_key == 0  # the key never goes to the storage host
    items = scan_dataset(tmp_path)
    assert [(i.key, i.prompt) for i in items] == [("00000", prompts[0]), ("00001", prompts[1]), ("00002", prompts[2])]
    assert json.loads((tmp_path / "00001.json").read_text())["seed"] == 11
    with Image.open(tmp_path / "00002.png") as img:
        assert img.size == (96, 64) and img.getpixel((0, 0))[0] == 12 * 40 % 256
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["teacher"] == "bfl:flux-pro-1.1-ultra"
    assert manifest["settings"]["aspect_ratio"] == "1:1" and API_KEY not in json.dumps(manifest)
    assert [i["status"] for i in manifest["items"]] == ["done", "done", "done", "moderated"]
    assert [i["seed"] for i in manifest["items"]] == [10, 11, 12, 13]


def test_retries_are_bounded_and_errors_fail_only_their_prompt(bfl: FakeBfl, tmp_path: Path) -> None:
    bfl.always_busy = True
    report = synthesize(["one"], tmp_path / "a", teacher(bfl, max_retries=2))
    assert list(report.failed) == [0] and "after 3 attempts" in report.failed[0]
    assert bfl.rejected[429] == 3

    bfl.always_busy = False
    report = synthesize(["fine", "explode now"], tmp_path / "b", teacher(bfl))
    assert report.done == [0] and "status 'Error'" in report.failed[1]


def test_an_interrupted_run_resumes_without_repeating_work(
    bfl: FakeBfl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from urae.cli import main

    prompts = ["first light", "second wind", "third rail", "moderate me please", "fifth element"]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("# teacher prompts\n" + "\n".join(prompts) + "\n\n")
    out = tmp_path / "out"
    monkeypatch.setenv("BFL_API_KEY", API_KEY)
    argv = ["synth", str(prompt_file), "--out", str(out), "--bfl-url", bfl.base, "--max-retries", "1", "--concurrency", "2"]

    bfl.broken = {"third rail"}  # the API keeps failing on this prompt: the run ends with it missing
    assert main(argv) == 1
    assert "prompt 2 failed" in capsys.readouterr().err
    assert not (out / "00002.json").exists() and (out / "00004.json").exists()
    # An interruption between the image and its caption: the prompt counts as not done.
    (out / "00001.json").unlink()
    first_submits = sum(bfl.submits.values())

    bfl.broken = set()
    assert main(argv) == 0
    assert "2 generated, 3 already done" in capsys.readouterr().out  # 0 and 4 done, 3 moderated
    assert sum(bfl.submits.values()) - first_submits == 2
    assert bfl.submits["first light"] == 1 and bfl.submits["moderate me please"] == 1
    assert [i.key for i in scan_dataset(out)] == ["00000", "00001", "00002", "00004"]

    # The same folder with a different prompt list is refused instead of mixing datasets.
    prompt_file.write_text("something else\n")
    assert main(argv) == 2
    assert "another prompt" in capsys.readouterr().err


def test_missing_key_and_bad_input_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from urae.cli import main

    monkeypatch.delenv("BFL_API_KEY", raising=False)
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("a prompt\n")
    assert main(["synth", str(prompt_file), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "BFL_API_KEY" in err and err.count("\n") == 1
    (tmp_path / "empty.txt").write_text("# nothing\n")
    assert main(["synth", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")]) == 2
    with pytest.raises(InvalidSpecError):
        BflTeacher(api_key="")


def test_local_teacher_writes_the_same_dataset_format(tmp_path: Path) -> None:
    from urae.synth import LocalTeacher

    local = LocalTeacher("tiny", preset="1k", device="cpu", dtype="float32", overrides={"width": 64, "height": 64, "steps": 2})
    report = synthesize(["a small red square", "a blue circle"], tmp_path, local, seed=3, concurrency=1)
    assert report.done == [0, 1]
    items = scan_dataset(tmp_path)
    assert [(i.prompt, i.width, i.height) for i in items] == [("a small red square", 64, 64), ("a blue circle", 64, 64)]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["teacher"] == "local:tiny" and manifest["settings"]["spec"]["steps"] == 2
    with Image.open(tmp_path / "00000.png") as a, Image.open(tmp_path / "00001.png") as b:
        assert a.tobytes() != b.tobytes()
