"""The Python client against the real stack: uvicorn API, Redis and a worker process on the tiny model."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from urae_client import AsyncClient, Client, Event, UraeError

from tests.conftest import API_KEY, REPO_ROOT, free_port, wait_for_port

SMALL = {"width": 64, "height": 64, "steps": 3, "seed": 5}
SLOW = {"width": 128, "height": 128, "steps": 100, "seed": 2}


@pytest.fixture(scope="module")
def worker(start_worker: Any) -> Any:
    return start_worker("gen-client", "--queues", "generate")


@pytest.fixture()
def urae(api_server: Any) -> Any:
    with Client(api_server.url, api_key=API_KEY) as client:
        yield client


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from urae.adapters import save_lora
    from urae.adapters.builtin import tiny_lora_layers
    from urae.tiny import build_tiny_pipeline

    transformer = build_tiny_pipeline("tiny").transformer
    return save_lora(tmp_path_factory.mktemp("lora") / "style.safetensors", tiny_lora_layers(transformer, 11))


def test_generate_waits_with_progress_and_previews_then_downloads(urae: Client, worker: Any, tmp_path: Path) -> None:
    progress: list[Event] = []
    previews: list[Event] = []
    job = urae.generate("a lighthouse", **SMALL, preview_every=1)
    assert job.status == "queued" and len(job.id) == 32
    job.wait(progress_callback=progress.append, preview_callback=previews.append, timeout=120)
    assert job.status == "finished", job.state.error
    steps = [e.progress.step for e in progress if e.progress and e.progress.stage == "denoise" and e.progress.step]
    assert steps == [1, 2, 3]
    assert previews and all(e.type == "preview" for e in previews)
    preview = previews[-1].image
    assert preview is not None
    with Image.open(io.BytesIO(preview)) as image:
        assert image.format == "JPEG" and max(image.size) <= 64
    content = job.download(0, tmp_path / "out.png")
    assert (tmp_path / "out.png").read_bytes() == content
    with Image.open(io.BytesIO(content)) as image:
        assert image.format == "PNG" and image.size == (64, 64)
    assert urae.job(job.id).state.result is not None


def test_events_iterate_status_to_the_end(urae: Client, worker: Any) -> None:
    job = urae.generate("a lighthouse", **SMALL, preview_every=0)
    events = list(job.events(timeout=120))
    statuses = [e.status for e in events if e.type == "status"]
    assert statuses[0] == "queued" and statuses[-1] == "finished"
    assert not [e for e in events if e.type == "preview"]
    assert events[-1].terminal and job.state.done


def test_a_long_prompt_is_reported_when_queued_and_exactly_when_done(urae: Client, worker: Any) -> None:
    long = " ".join(f"a lighthouse number {i} on a cliff" for i in range(20))  # 140 words
    job = urae.generate(long, **SMALL, preview_every=0)
    # The API's estimate (it has no tokenizer): more words than CLIP has tokens.
    assert job.state.warnings and "140 words" in job.state.warnings[0]
    events = list(job.events(timeout=120))
    final = events[-1]
    assert final.status == "finished"
    assert any("CLIP reads only the first 77" in w for w in final.data["result"]["warnings"])
    # The job's JSON carries the worker's exact warnings (counted with the model's tokenizers).
    assert job.state.warnings == final.data["result"]["warnings"]
    short = urae.generate("a lighthouse", **SMALL, preview_every=0)
    assert short.state.warnings == [] and short.wait(timeout=120).state.warnings == []


def test_cancel_a_running_job(urae: Client, worker: Any) -> None:
    job = urae.generate("a slow one", **SLOW)
    for event in job.events(timeout=120):
        if event.type == "progress":
            break
    job.cancel()
    assert job.wait(timeout=60).status == "canceled"
    with pytest.raises(UraeError) as err:
        job.download(0)
    assert err.value.status == 409


def test_adapter_upload_use_and_delete(urae: Client, worker: Any, lora_file: Path) -> None:
    adapter = urae.upload_adapter("client-style", lora_file, description="stripes")
    assert adapter.name == "client-style" and adapter.rank and adapter.description == "stripes"
    assert "client-style" in [a.name for a in urae.adapters()]
    assert urae.adapter("client-style").version == adapter.version
    job = urae.generate("a fox", **SMALL, adapters=[("client-style", 0.8)]).wait(timeout=120)
    assert job.status == "finished", job.state.error
    urae.delete_adapter("client-style")
    with pytest.raises(UraeError) as missing:
        urae.adapter("client-style")
    assert missing.value.status == 404
    with pytest.raises(UraeError) as refused:
        urae.generate("a fox", **SMALL, adapters=["client-style"])
    assert refused.value.status == 422 and refused.value.field == "adapters[0].name"
    assert "client-style" in refused.value.detail


def test_errors_carry_status_detail_and_field(api_server: Any, urae: Client) -> None:
    with pytest.raises(UraeError) as err:
        urae.generate("a fox", width=100, height=64)
    assert err.value.status == 422 and err.value.field == "width" and "multiple of 16" in err.value.detail
    with Client(api_server.url, api_key="not-the-key") as stranger, pytest.raises(UraeError) as refused:
        stranger.adapters()
    assert refused.value.status == 401
    with Client(f"http://127.0.0.1:{free_port()}", api_key=API_KEY) as nowhere, pytest.raises(UraeError) as down:
        nowhere.health()
    assert down.value.status is None and "ConnectError" in down.value.detail


def test_health_ready_and_config(urae: Client, worker: Any) -> None:
    assert urae.health() == {"status": "ok"}
    assert urae.ready()["status"] == "ready"
    config = urae.config()
    assert config["devices"] == ["cpu"] and config["suggested"]["width"] == 512 and config["suggested"]["steps"] == 4


def _dataset_zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for i, color in enumerate(("red", "blue")):
            png = io.BytesIO()
            Image.new("RGB", (64, 64), color).save(png, "PNG")
            archive.writestr(f"photo{i}.png", png.getvalue())
            archive.writestr(f"photo{i}.txt", f"a {color} square")
    return out.getvalue()


def test_finetune_upload_and_datasets(urae: Client) -> None:
    # No fine-tune worker runs in this module: the job stays queued, which keeps its dataset busy.
    job = urae.finetune("client-pets", dataset=_dataset_zip(), dataset_name="client-pets",
                        recipe={"steps": 2, "resolution": 64})
    assert job.state.kind == "finetune" and job.status == "queued"
    again = urae.finetune("client-pets-2", dataset_name="client-pets", recipe={"steps": 2, "resolution": 64})
    dataset = urae.dataset("client-pets")
    assert dataset.images == 2 and dataset.size_bytes > 0
    assert "client-pets" in [d.name for d in urae.datasets()]
    with pytest.raises(UraeError) as busy:
        urae.delete_dataset("client-pets")
    assert busy.value.status == 409
    job.cancel()
    again.cancel()
    urae.delete_dataset("client-pets")
    with pytest.raises(UraeError) as gone:
        urae.dataset("client-pets")
    assert gone.value.status == 404


def test_async_client_generates_cancels_and_raises(api_server: Any, worker: Any, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with AsyncClient(api_server.url, api_key=API_KEY) as urae:
            steps: list[int] = []

            async def on_progress(event: Event) -> None:
                assert event.progress is not None
                if event.progress.stage == "denoise" and event.progress.step:
                    steps.append(event.progress.step)

            job = await urae.generate("a lighthouse", **SMALL, preview_every=0)
            await job.wait(progress_callback=on_progress, timeout=120)
            assert job.status == "finished" and steps == [1, 2, 3]
            with Image.open(io.BytesIO(await job.download(0, tmp_path / "a.png"))) as image:
                assert image.size == (64, 64)

            slow = await urae.generate("a slow one", **SLOW)
            async for event in slow.events(timeout=120):
                if event.type == "progress":
                    break
            await slow.cancel()
            assert (await slow.wait(timeout=60)).status == "canceled"

            with pytest.raises(UraeError) as err:
                await urae.generate("a fox", width=64, height=64, adapters=["no-such-adapter"])
            assert err.value.status == 422 and err.value.field == "adapters[0].name"

    asyncio.run(scenario())


def test_image_to_image_and_refine(urae: Client, worker: Any, api_server: Any, tmp_path: Path) -> None:
    draft = urae.generate("a lighthouse", **SMALL, num_images=2).wait(timeout=120)
    assert draft.status == "finished", draft.state.error
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(draft.download(1))).convert("RGB").save(jpeg, "JPEG")
    (tmp_path / "draft.webp").write_bytes(draft.download(0))
    Image.open(tmp_path / "draft.webp").save(tmp_path / "draft.webp", "WEBP")
    # Bytes and paths go as data URLs with the media type their first bytes say; a dict names a job's image.
    for image in (jpeg.getvalue(), tmp_path / "draft.webp", str(tmp_path / "draft.webp"), {"job": draft.id, "index": 1}):
        job = urae.generate("a lighthouse at night", **SMALL, image=image, strength=0.5).wait(timeout=120)
        assert job.status == "finished", (image if isinstance(image, dict) else type(image), job.state.error)
        assert job.state.result is not None and job.state.result["strength"] == 0.5
    assert job.state.result["input_image"]["job"] == draft.id
    with pytest.raises(ValueError, match="not a PNG, JPEG or WebP"):
        urae.generate("x", image=b"GIF89a....")

    refined = urae.refine(draft.id, width=128, height=128, index=1, strength=0.1).wait(timeout=120)
    assert refined.status == "finished", refined.state.error
    result = refined.state.result
    assert result is not None and result["seed"] == SMALL["seed"] + 1 and (result["width"], result["height"]) == (128, 128)
    with pytest.raises(UraeError) as err:
        urae.refine(draft.id, preset="1k", index=3)
    assert err.value.status == 422 and err.value.field == "index"

    async def scenario() -> None:
        async with AsyncClient(api_server.url, api_key=API_KEY) as aurae:
            job = await (await aurae.refine(draft.id, width=64, height=128, strength=0.05)).wait(timeout=120)
            assert job.status == "finished" and job.state.result is not None
            assert (job.state.result["width"], job.state.result["height"]) == (64, 128)
            job = await (await aurae.generate("a fox", **SMALL, image={"job": draft.id}, strength=1.0)).wait(timeout=120)
            assert job.status == "finished" and job.state.result is not None and job.state.result["strength"] == 1.0

    asyncio.run(scenario())


class RestartableApi:
    """uvicorn on a fixed port, stopped and started again while a client follows a job."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env, "URAE_API_SHUTDOWN_GRACE_S": "2"}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory", "--host", "127.0.0.1",
                 "--port", str(self.port), "--log-level", "warning"],
                cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, 30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)


def test_wait_survives_an_api_restart(service_env: dict[str, str], worker: Any, tmp_path: Path) -> None:
    api = RestartableApi(service_env, tmp_path / "api.log")
    api.start()
    try:
        with Client(f"http://127.0.0.1:{api.port}", api_key=API_KEY) as urae:
            job = urae.generate("a restart", width=128, height=128, steps=30, seed=3, preview_every=0)
            steps: list[int] = []
            restarted = False
            for event in job.events(timeout=180):
                if event.progress and event.progress.stage == "denoise" and event.progress.step:
                    steps.append(event.progress.step)
                    if not restarted and event.progress.step >= 2:
                        restarted = True
                        api.stop()  # open streams get `event: reconnect`, then the port is closed a while
                        time.sleep(1.0)
                        api.start()
            assert job.status == "finished", job.state.error
            # Reconnected with Last-Event-ID: every step once, in order, none lost or repeated.
            assert steps == list(range(1, 31))
    finally:
        api.stop()


README = (REPO_ROOT / "README.md").read_text()


def test_the_readme_python_example_runs_as_written(api_server: Any, worker: Any, tmp_path: Path) -> None:
    block = re.search(r"### From Python.*?```python\n(.*?)```", README, re.S)
    assert block is not None
    env = {**os.environ, "API": api_server.url, "KEY": API_KEY}
    result = subprocess.run([sys.executable, "-c", block.group(1)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "denoise 4 4" in result.stdout and "finished" in result.stdout
    assert "422 width" in result.stdout
    with Image.open(tmp_path / "fox.png") as image:
        assert image.size == (256, 256)


def test_the_client_readme_examples_run_as_written(api_server: Any, worker: Any, tmp_path: Path) -> None:
    text = (REPO_ROOT / "client" / "README.md").read_text()
    assert "pip install ./client" in text
    sync_block, async_block = re.findall(r"```python\n(.*?)```", text, re.S)
    env = {**os.environ, "URAE_API_URL": api_server.url, "URAE_API_KEY": API_KEY}
    outputs = []
    for block in (sync_block, async_block):
        result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout)
    assert outputs[0].splitlines()[0] == "ready" and "denoise 4 4" in outputs[0]
    assert "finished 7 True" in outputs[0] and "422 width width:" in outputs[0]
    assert "0.7 384 7" in outputs[0]
    with Image.open(tmp_path / "lighthouse.png") as image:
        assert image.size == (256, 256)
    finished = [line.split() for line in outputs[1].splitlines() if line.endswith(" finished")]
    assert len(finished) == 2 and "preview" in outputs[1]
    for job_id, _ in finished:
        with Image.open(tmp_path / f"{job_id}.png") as image:
            assert image.size == (128, 128)
    # The package carries it as its description.
    pyproject = (REPO_ROOT / "client" / "pyproject.toml").read_text()
    assert 'readme = "README.md"' in pyproject


def test_the_client_imports_without_the_server_side(tmp_path: Path) -> None:
    """Installed alone it has only httpx: importing it must not need torch, fastapi, redis or the server."""
    code = (
        "import sys, importlib.abc\n"
        "BANNED = {'torch', 'fastapi', 'redis', 'rq', 'urae', 'service', 'jobstore', 'worker', 'diffusers',"
        " 'pydantic', 'PIL', 'numpy'}\n"
        "class Refuse(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BANNED:\n"
        "            raise ImportError('the client imported ' + name)\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import urae_client\n"
        "from urae_client import AsyncClient, Client, UraeError\n"
        "print('ok', sorted(m for m in sys.modules if m.split('.')[0] in BANNED))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok []"


def test_the_client_builds_alone_with_only_httpx(tmp_path: Path) -> None:
    # Built from a copy: a build leaves build/ and egg-info folders next to its pyproject.
    source = shutil.copytree(REPO_ROOT / "client", tmp_path / "client",
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("urae_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert {n.split("/")[0] for n in names if not n.startswith("urae_client-")} == {"urae_client"}
    assert re.findall(r"^Requires-Dist: (\S+)", metadata, re.M) == ["httpx<1,>=0.27"]


def test_a_full_queue_raises_with_retry_after(service_env: dict[str, str], worker: Any, tmp_path: Path) -> None:
    api = RestartableApi({**service_env, "URAE_MAX_QUEUED_JOBS_PER_KEY": "1"}, tmp_path / "api.log")
    api.start()
    jobs = []
    try:
        with Client(f"http://127.0.0.1:{api.port}", api_key=API_KEY) as urae:
            with pytest.raises(UraeError) as err:
                for _ in range(3):
                    jobs.append(urae.generate("a slow one", **SLOW, priority="low"))
            for job in jobs:
                job.cancel()
        assert err.value.status == 429 and err.value.retry_after is not None and err.value.retry_after > 0
        assert "URAE_MAX_QUEUED_JOBS_PER_KEY" in err.value.detail
    finally:
        api.stop()
