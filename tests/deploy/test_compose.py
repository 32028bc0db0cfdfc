"""The GPU-host deployment, checked without a Docker engine: compose file, Dockerfiles, API image deps."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from jobstore.settings import Settings
from tests.conftest import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
COMPOSE_S3 = REPO_ROOT / "docker-compose.s3.yml"
COMPOSE_REDIS_TLS = REPO_ROOT / "docker-compose.redis-tls.yml"
COMPOSE_WORKER_HOST = REPO_ROOT / "docker-compose.worker-host.yml"
ALL_COMPOSE_FILES = (COMPOSE, COMPOSE_S3, COMPOSE_REDIS_TLS, COMPOSE_WORKER_HOST)
API_DOCKERFILE = REPO_ROOT / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = REPO_ROOT / "docker" / "worker.Dockerfile"
API_REQUIREMENTS = REPO_ROOT / "docker" / "requirements-api.txt"
# Longest single job a worker may be finishing when stopped: URAE's notebook puts a 4K image at
# about 5 minutes on an H100.
FOUR_K_JOB_S = 300
# Imported when installed, not needed: rq's greenlet support and its process titles (setproctitle, which
# the dev extra's mutmut brings); setuptools' distutils shim (a .pth file).
OPTIONAL_IMPORTS = {"greenlet", "setproctitle", "setuptools"}
INTERPOLATION_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services_where(compose: dict[str, Any], queue: str) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if s.get("command", [None])[-1] == queue}


def seconds(duration: str) -> float:
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration):
        total += float(amount) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in dockerfile_instructions(path):
        if op == "ENV":
            env.update(dict(pair.split("=", 1) for pair in args.split()))
    return env


def test_the_stack_has_redis_api_a_worker_per_gpu_and_a_finetune_worker(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "api", "worker-gpu0", "worker-gpu1", "worker-finetune"} <= set(services)
    generation = services_where(compose, "generate")
    assert set(generation) == {"worker-gpu0", "worker-gpu1"}
    assert set(services_where(compose, "finetune")) == {"worker-finetune"}
    # worker-gpu0 starts on any GPU host; the second GPU's worker is opt-in.
    assert "profiles" not in services["worker-gpu0"] and services["worker-gpu1"]["profiles"] == ["gpu1"]


def test_every_worker_reserves_gpus_by_device_id_and_generation_workers_one_each(compose: dict[str, Any]) -> None:
    device_ids = {}
    for name in (*services_where(compose, "generate"), "worker-finetune"):
        devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        assert "count" not in devices[0]
        device_ids[name] = devices[0]["device_ids"]
    assert device_ids["worker-gpu0"] == ["0"] and device_ids["worker-gpu1"] == ["1"]
    # Training loads a second model: never by default on worker-gpu0's GPU, and only when asked for.
    assert device_ids["worker-finetune"] == ["${FINETUNE_GPU:-1}"]
    assert compose["services"]["worker-finetune"]["profiles"] == ["finetune"]


def test_redis_is_durable_private_and_password_protected(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert flag in command
    # The image's entrypoint drops to the redis user only for a command that starts with redis-server:
    # the shell adds the password from the environment and hands over to that entrypoint.
    assert redis["command"][0] == "redis-server"
    assert redis["entrypoint"][:2] == ["sh", "-c"]
    assert redis["entrypoint"][2] == 'exec docker-entrypoint.sh "$$@" --requirepass "$$REDIS_PASSWORD"'
    assert "ports" not in redis, "Redis must not be published on the host"
    assert "redis-data:/data" in redis["volumes"] and "redis-data" in compose["volumes"]
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    # Every client connects with the password.
    for name, service in compose["services"].items():
        url = service.get("environment", {}).get("URAE_REDIS_URL")
        if name != "redis":
            assert url == "redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD in .env}@redis:6379/0", name


def test_every_service_has_a_healthcheck_and_waits_for_redis(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        check = service["healthcheck"]["test"]
        assert check[0] in ("CMD", "CMD-SHELL") and len(check) > 1, name
        if name != "redis":
            assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
    worker_check = compose["services"]["worker-gpu0"]["healthcheck"]
    # First start downloads the model: the start period must cover it.
    assert seconds(worker_check["start_period"]) >= 1800
    assert compose["services"]["api"]["healthcheck"]["test"][-1] == "api"
    assert worker_check["test"][-1] == "worker"


def test_the_api_listens_on_the_container_network_whatever_env_says(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    # environment wins over env_file, so a .env written for a host install cannot hide the API.
    assert api["environment"]["URAE_API_HOST"] == "0.0.0.0"
    assert api["ports"] == ["${API_PORT:-8000}:" + api["environment"]["URAE_API_PORT"]]


def test_outputs_and_adapters_live_on_one_volume_shared_by_api_and_workers(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name == "redis":
            continue
        storage = service["environment"]["URAE_STORAGE_DIR"]
        assert f"urae-data:{storage}" in service["volumes"], name
    assert "urae-data" in compose["volumes"]


def test_workers_get_the_hf_token_and_keep_the_hf_cache_on_a_volume(compose: dict[str, Any]) -> None:
    hf_home = dockerfile_env(WORKER_DOCKERFILE)["HF_HOME"]
    for name in (*services_where(compose, "generate"), "worker-finetune"):
        service = compose["services"][name]
        assert service["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}", name
        assert f"hf-cache:{hf_home}" in service["volumes"], name
        assert service["environment"]["URAE_MODEL"] == "${URAE_MODEL:-black-forest-labs/FLUX.1-dev}"
    assert "hf-cache" in compose["volumes"]
    assert "HF_TOKEN" not in compose["services"]["api"].get("environment", {})


def test_generation_workers_keep_the_compile_cache_on_a_volume(compose: dict[str, Any]) -> None:
    # A restarted worker's warm-up reads its compiled blocks back instead of compiling for minutes.
    env = dockerfile_env(WORKER_DOCKERFILE)
    cache = "/cache/torch"
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(cache + "/") and env["TRITON_CACHE_DIR"].startswith(cache + "/")
    for name in services_where(compose, "generate"):
        assert f"torch-compile-cache:{cache}" in compose["services"][name]["volumes"], name
    assert "torch-compile-cache" in compose["volumes"]


def test_generation_workers_may_finish_a_4k_job_before_they_are_killed(compose: dict[str, Any]) -> None:
    for name in services_where(compose, "generate"):
        service = compose["services"][name]
        grace = seconds(service["stop_grace_period"])
        own = float(service["environment"]["URAE_SHUTDOWN_GRACE_S"])
        assert FOUR_K_JOB_S <= own < grace, name


@pytest.mark.parametrize("path", ALL_COMPOSE_FILES, ids=lambda p: p.name)
def test_every_urae_variable_of_the_compose_file_is_a_setting(path: Path) -> None:
    compose = yaml.safe_load(path.read_text())
    fields = {f"URAE_{name.upper()}" for name in Settings.model_fields}
    # The API launcher's own two variables (service.app.main), outside Settings.
    launcher = {"URAE_API_HOST", "URAE_API_PORT"}
    app_source = (REPO_ROOT / "service" / "app.py").read_text()
    assert all(f'os.environ.get("{name}"' in app_source for name in launcher)
    fields |= launcher
    named = set(INTERPOLATION_RE.findall(path.read_text()))
    for service in compose["services"].values():
        named |= set(service.get("environment", {}))
    urae_vars = {n for n in named if n.startswith("URAE_")}
    assert urae_vars <= fields, urae_vars - fields
    # Everything else it reads from the environment is a compose-level variable documented in the README.
    readme = (REPO_ROOT / "README.md").read_text()
    for name in sorted(named - urae_vars - {"REDISCLI_AUTH"}):
        assert f"`{name}`" in readme, f"{name} is not documented in README.md"


def base_image_default(instructions: list[tuple[str, str]]) -> str:
    """The base image of every stage: one build argument whose default is the public image."""
    assert instructions[0][0] == "ARG"
    name, default = instructions[0][1].split("=", 1)
    assert {args.split()[0] for op, args in instructions if op == "FROM"} == {f"${{{name}}}"}
    return default


def test_worker_image_is_cuda_pytorch_non_root_with_a_healthcheck() -> None:
    instructions = dockerfile_instructions(WORKER_DOCKERFILE)
    # A slim Python base; torch is PyPI's Linux wheel at the lock's version, the CUDA build unless
    # TORCH_INDEX_URL names the CPU index (docker-compose.cpu.yml).
    assert base_image_default(instructions) == "python:3.11-slim"
    runs = [args for op, args in instructions if op == "RUN"]
    assert any('"torch==$(sed -n \'s/^torch==//p\' /tmp/requirements.lock)"' in run for run in runs)
    assert "ARG TORCH_INDEX_URL=" in WORKER_DOCKERFILE.read_text()
    # Triton (torch.compile on CUDA) compiles at run time: the final image has a C compiler.
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    assert any(op == "RUN" and "apt-get install" in args and "gcc" in args for op, args in final)
    # The optional extras ship: prodigy (optimizer: "prodigy" is accepted by the API) and torchao.
    assert any('"/src[train,gpu]"' in run for run in runs)
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(op == "HEALTHCHECK" for op, _ in instructions)
    volumes = json.loads(next(args for op, args in instructions if op == "VOLUME"))
    assert dockerfile_env(WORKER_DOCKERFILE)["HF_HOME"] in volumes
    assert next(args for op, args in instructions if op == "ENTRYPOINT") == '["urae-worker"]'
    # The console scripts the images run exist.
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["urae-worker"] == "worker.cli:main" and scripts["urae-api"] == "service.app:main"


def test_api_image_is_slim_non_root_with_a_healthcheck_and_no_torch() -> None:
    instructions = dockerfile_instructions(API_DOCKERFILE)
    assert base_image_default(instructions) == "python:3.11-slim"
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(op == "HEALTHCHECK" for op, _ in instructions)
    assert instructions[-1] == ("CMD", '["urae-api"]')
    copied = " ".join(args for op, args in instructions if op == "COPY")
    assert "urae " not in copied and "worker " not in copied
    for op, args in instructions:
        if op == "RUN" and "pip install" in args:
            assert "torch" not in args and ("-r /tmp/requirements-api.txt" in args or "--no-deps" in args)


@pytest.mark.parametrize("path", [API_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_every_pip_install_of_the_images_is_held_to_the_lock(path: Path) -> None:
    """What CI tested is what ships: every install resolves within requirements.lock. (The container
    test lists what the built images hold and compares it with the lock.)"""
    instructions = dockerfile_instructions(path)
    copied = [args for op, args in instructions if op == "COPY"]
    assert any(args.startswith("requirements.lock ") for args in copied)
    installs = [args for op, args in instructions if op == "RUN" and "pip install" in args]
    assert installs
    for args in installs:
        for command in args.split("&&"):
            if "pip install" in command:
                assert "-c /tmp/requirements.lock" in command, command


def test_the_lock_pins_one_torch_and_ci_and_the_readme_install_from_it() -> None:
    lock = (REPO_ROOT / "requirements.lock").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, re.M))
    wanted = (REPO_ROOT / "docker" / "lock-pins.txt").read_text()
    assert "torch==" + pins["torch"] in wanted.splitlines()
    # The lock is the tool's output (its header names the command that refreshes it), not hand-written.
    assert lock.startswith("# This file was autogenerated by uv via the following command:\n#    bash docker/refresh-lock.sh\n")
    # Everything the images and CI need is pinned: the extras and their CUDA dependencies included.
    for name in ("torchao", "prodigyopt", "peft", "diffusers", "triton", "nvidia-cublas"):
        assert name in pins, name
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "-c requirements.lock" in ci and '-e ".[dev,train,gpu]"' in ci
    readme = (REPO_ROOT / "README.md").read_text()
    setup = readme[readme.index("## Setup"):readme.index("## Generate an image on a CPU")]
    assert f"pip install -c requirements.lock torch=={pins['torch']}" in setup
    assert 'pip install -c requirements.lock -e ".[dev,train,gpu]"' in setup


def _closure(requirements: list[Requirement]) -> set[str]:
    """Distribution names the requirements pull in, transitively, as installed here."""
    seen: set[str] = set()
    stack = list(requirements)
    while stack:
        req = stack.pop()
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        extras = req.extras or {""}
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                stack.append(sub)
    return seen


def test_the_api_image_requirements_cover_everything_the_api_imports() -> None:
    lines = [ln.split("#")[0].strip() for ln in API_REQUIREMENTS.read_text().splitlines()]
    requirements = [Requirement(ln) for ln in lines if ln]
    allowed = _closure(requirements)
    assert not allowed & {"torch", "diffusers", "transformers", "peft", "accelerate"}
    # Import and build the API as its container does, then list the third-party modules it loaded.
    probe = (
        "import json, sys\n"
        "from importlib.metadata import packages_distributions\n"
        "from service.app import create_app\n"
        "from jobstore.settings import Settings\n"
        "create_app(Settings(api_keys='k'))\n"
        "import uvicorn\n"
        "dists = packages_distributions()\n"
        "top = {m.split('.')[0] for m in sys.modules if not m.startswith('_')} - set(sys.stdlib_module_names)\n"
        "print(json.dumps(sorted({d for m in top - {'service', 'jobstore'} for d in dists.get(m, [m])})))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = {d.lower().replace("_", "-") for d in json.loads(out.stdout.splitlines()[-1])}
    assert "torch" not in loaded
    missing = loaded - allowed - OPTIONAL_IMPORTS
    assert not missing, f"the API imports {missing}, which docker/requirements-api.txt does not bring"
    # The ranges agree with pyproject.toml, so the image runs what the tests ran.
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = {r.name: r for r in map(Requirement, project["dependencies"])}
    for req in requirements:
        assert req.name in declared, f"{req.name} is not a dependency in pyproject.toml"
        assert declared[req.name].specifier == req.specifier, f"{req} vs pyproject.toml's {declared[req.name]}"


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(API_DOCKERFILE), str(WORKER_DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_build_context_leaves_out_local_state() -> None:
    ignored = set((REPO_ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".env", "data"} <= ignored


# -- S3 mode and many hosts ---------------------------------------------------------------------------
def merged(*paths: Path) -> dict[str, Any]:
    """Compose files merged as ``docker compose -f a -f b`` does for what these files use: mappings
    (environment, depends_on, services) merge key by key, anything else from a later file replaces."""

    def merge(base: Any, override: Any) -> Any:
        if isinstance(base, dict) and isinstance(override, dict):
            return {**base, **{k: merge(base.get(k), v) if k in base else v for k, v in override.items()}}
        return override

    result: dict[str, Any] = {}
    for path in paths:
        result = merge(result, yaml.safe_load(path.read_text()))
    return result


def default_of(value: str) -> str:
    """``${NAME:-default}`` -> default, as compose substitutes it when NAME is unset."""
    return re.sub(r"\$\{[A-Za-z_0-9]+:-([^}]*)\}", r"\1", value)


def test_s3_mode_adds_minio_a_one_shot_bucket_and_points_every_service_at_it() -> None:
    stack = merged(COMPOSE, COMPOSE_S3)
    services = stack["services"]
    minio, bucket = services["minio"], services["minio-bucket"]
    assert "minio-data" in stack["volumes"]
    assert minio["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    assert minio["environment"]["MINIO_ROOT_PASSWORD"].startswith("${MINIO_ROOT_PASSWORD:?")
    # The bucket is made once at start (idempotent), after MinIO is healthy; the job then exits.
    assert default_of(bucket["image"]).startswith("minio/mc:RELEASE.") and bucket["restart"] == "no"
    assert "mc mb --ignore-existing" in " ".join(bucket["command"])
    assert bucket["depends_on"]["minio"]["condition"] == "service_healthy"
    assert default_of(minio["image"]).startswith("minio/minio:RELEASE.")
    users = [name for name in services if name not in ("redis", "minio", "minio-bucket")]
    assert {"api", "worker-gpu0", "worker-gpu1", "worker-finetune"} <= set(users)
    for name in users:
        env = services[name]["environment"]
        assert env["URAE_STORAGE_URL"] == "s3://${S3_BUCKET:-urae}/serve", name
        assert env["URAE_S3_ENDPOINT_URL"] == "http://minio:9000", name
        assert env["AWS_SECRET_ACCESS_KEY"] == minio["environment"]["MINIO_ROOT_PASSWORD"], name
        assert env["AWS_ACCESS_KEY_ID"] == minio["environment"]["MINIO_ROOT_USER"], name
        # Merged, not replaced: the base file's Redis URL and Redis dependency are still there.
        assert env["URAE_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD:?"), name
        assert services[name]["depends_on"]["minio-bucket"]["condition"] == "service_completed_successfully"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    # The storage settings the services get are valid settings, naming the S3 backend.
    from jobstore.storage import open_storage

    env = {k: default_of(v) for k, v in services["api"]["environment"].items()
           if k.startswith("URAE_") and v is not None}
    settings = Settings(api_keys="k", **{k.removeprefix("URAE_").lower(): v for k, v in env.items()
                                         if k not in ("URAE_API_HOST", "URAE_API_PORT")})
    assert settings.storage_location == "s3://urae/serve"
    assert type(open_storage(settings.model_copy(update={"cache_dir": Path("/tmp")}))).__name__ == "S3Storage"


def test_the_single_host_file_alone_still_uses_the_local_volume(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        # Only passed on from .env (another store, see README), never set by the file.
        assert service.get("environment", {}).get("URAE_STORAGE_URL") is None, name
    assert "minio" not in compose["services"]


def test_the_worker_host_file_starts_only_gpu_workers_against_the_remote_redis_and_store() -> None:
    stack = yaml.safe_load(COMPOSE_WORKER_HOST.read_text())
    services = stack["services"]
    assert set(services) == {"worker-gpu0", "worker-gpu1"}
    assert "profiles" not in services["worker-gpu0"] and services["worker-gpu1"]["profiles"] == ["gpu1"]
    for name, service in services.items():
        env = service["environment"]
        assert service["command"] == ["--queues", "generate"], name
        # Nothing runs without the remote Redis and the object store named in .env.
        assert env["URAE_REDIS_URL"].startswith("${URAE_REDIS_URL:?"), name
        assert env["URAE_STORAGE_URL"].startswith("${URAE_STORAGE_URL:?"), name
        assert env["AWS_SECRET_ACCESS_KEY"].startswith("${AWS_SECRET_ACCESS_KEY:?"), name
        assert service["env_file"][0]["required"] is True
        # No shared volume: only this host's cache, the model and compile caches, the CA certificate.
        assert "urae-data:/data" not in service["volumes"] and "worker-cache:/data" in service["volumes"]
        assert "./tls:/tls:ro" in service["volumes"]
        assert service["healthcheck"]["test"][-1] == "worker"
        assert FOUR_K_JOB_S <= float(env["URAE_SHUTDOWN_GRACE_S"]) < seconds(service["stop_grace_period"])
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["capabilities"] == ["gpu"]
    assert services["worker-gpu0"]["hostname"] != services["worker-gpu1"]["hostname"]


def test_the_main_host_publishes_redis_only_over_tls_with_the_password() -> None:
    stack = merged(COMPOSE, COMPOSE_REDIS_TLS)
    redis = stack["services"]["redis"]
    command = " ".join(redis["command"])
    for flag in ("--appendonly yes", "--maxmemory-policy noeviction", "--tls-port 6380", "--tls-cert-file",
                 "--tls-key-file"):
        assert flag in command
    # Still started through the main file's entrypoint: the password, and the redis user.
    assert redis["command"][0] == "redis-server" and "--requirepass" in redis["entrypoint"][2]
    assert redis["ports"] == ["${REDIS_TLS_PORT:-6380}:6380"]  # the plain port stays inside
    assert "redis-data:/data" in redis["volumes"] and "./tls:/tls:ro" in redis["volumes"]


def test_a_rediss_url_reaches_a_tls_redis_with_its_password(tmp_path: Path) -> None:
    """What a worker host does: settings from a rediss:// URL, connect, use RQ's queue over TLS, with
    the certificates the README's "Many hosts" commands make (the main host's name: localhost)."""
    import redis

    from jobstore.queues import connect, rq_queue
    from tests.conftest import REDIS_SERVER, free_port, wait_for_port

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("### Many hosts"):]
    block = re.search(r"```bash\n\s*(mkdir -p tls.*?)```", section, re.S)
    assert block is not None, "the README's certificate commands"
    made = subprocess.run(["bash", "-ec", block.group(1).replace("main-host.example", "localhost")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    tls = tmp_path / "tls"
    port = free_port()
    server = subprocess.Popen(
        [REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--requirepass", "s3cret", "--tls-cert-file", str(tls / "redis.crt"),
         "--tls-key-file", str(tls / "redis.key"), "--tls-ca-cert-file", str(tls / "ca.crt"),
         "--tls-auth-clients", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        # The host name is checked against the certificate: the client names the host it was made for.
        url = f"rediss://:s3cret@localhost:{port}/0?ssl_ca_certs={tls / 'ca.crt'}"
        settings = Settings(api_keys="k", redis_url=url)
        conn = connect(settings.redis_url)
        assert conn.ping()
        rq_queue(conn, "generate-normal").enqueue("worker.jobs.run_generate", {"job_id": "x"})
        assert conn.llen("rq:queue:generate-normal") == 1
        with pytest.raises(redis.AuthenticationError):
            connect(url.replace(":s3cret@", ":wrong@")).ping()
        with pytest.raises(redis.ConnectionError):  # plain text to the TLS port is refused
            connect(f"redis://:s3cret@127.0.0.1:{port}/0", 1.0).ping()
    finally:
        server.terminate()
        server.wait(timeout=10)


# -- what each container gets from .env ---------------------------------------------------------------
# Set by the compose files per service (URLs, paths, devices), or secrets given only where needed.
PER_SERVICE = {"URAE_REDIS_URL", "URAE_STORAGE_DIR", "URAE_MODEL", "URAE_DEVICE", "URAE_DTYPE",
               "URAE_SHUTDOWN_GRACE_S"}
API_SECRETS = {"URAE_API_KEYS", "URAE_API_KEY_HASHES", "URAE_ADMIN_KEYS", "URAE_ADMIN_KEY_HASHES"}


def test_every_setting_in_env_reaches_the_containers_and_no_container_reads_env_whole(
    compose: dict[str, Any],
) -> None:
    """.env is Compose's: a container gets the non-secret URAE_* settings from it by name (a setting
    missing from x-urae-settings would silently never reach a container), never the file itself."""
    settings = {f"URAE_{name.upper()}" for name in Settings.model_fields}
    forwarded = set(compose["x-urae-settings"])
    assert all(value is None for value in compose["x-urae-settings"].values())  # from .env, or unset
    secret = API_SECRETS | {"URAE_WEBHOOK_SECRET"}
    assert settings - forwarded == PER_SERVICE | secret, sorted(settings - forwarded - PER_SERVICE - secret)
    for path in (COMPOSE, COMPOSE_S3, COMPOSE_REDIS_TLS):
        for name, service in yaml.safe_load(path.read_text())["services"].items():
            assert "env_file" not in service, f"{path.name}: {name}"


def test_each_service_gets_only_the_secrets_it_needs() -> None:
    for files in ((COMPOSE,), (COMPOSE, COMPOSE_S3)):
        services = merged(*files)["services"]
        for name, service in services.items():
            env = set(service.get("environment", {}))
            if name.startswith("worker"):
                assert "HF_TOKEN" in env and not env & (API_SECRETS | {"URAE_WEBHOOK_SECRET"}), name
            elif name in ("api", "webhooks"):
                assert "URAE_WEBHOOK_SECRET" in env and "HF_TOKEN" not in env, name
                # The API checks keys; the webhook sender answers no HTTP and holds none.
                assert API_SECRETS <= env if name == "api" else not env & API_SECRETS
            if name not in ("redis", "minio", "minio-bucket"):
                assert not env & {"REDIS_PASSWORD", "MINIO_ROOT_PASSWORD", "MINIO_ROOT_USER"}, name


def test_the_cpu_override_runs_the_same_stack_with_the_tiny_model_and_no_gpus() -> None:
    class ComposeLoader(yaml.SafeLoader):
        """Compose's `!reset` tag (drop what the files before set): read as the value it resets to."""

    ComposeLoader.add_constructor("!reset", lambda loader, node: loader.construct_mapping(node)
                                  if isinstance(node, yaml.MappingNode) else loader.construct_sequence(node))
    stack = yaml.safe_load(COMPOSE.read_text())
    cpu = yaml.load((REPO_ROOT / "docker-compose.cpu.yml").read_text(), Loader=ComposeLoader)  # noqa: S506
    assert set(cpu["services"]) <= set(stack["services"])
    for name in ("worker-gpu0", "worker-gpu1", "worker-finetune"):
        service = cpu["services"][name]
        assert service["environment"]["URAE_MODEL"] == "tiny" and service["environment"]["URAE_DEVICE"] == "cpu"
        assert service["deploy"] == {}, name  # `!reset {}`: the main file's GPU reservations are dropped
        assert service["image"] == "urae-serve-worker:cpu"
    for name in ("api", "webhooks"):
        assert cpu["services"][name]["environment"]["URAE_MODEL"] == "tiny"
    # The same Dockerfile, built once, with torch's CPU build at the lock's version.
    args = cpu["services"]["worker-gpu0"]["build"]["args"]
    assert default_of(args["TORCH_INDEX_URL"]) == "https://download.pytorch.org/whl/cpu"
    assert stack["services"]["worker-gpu0"]["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert [n for n, s in stack["services"].items() if "build" in s] == ["api", "worker-gpu0"]
    assert "!reset" in (REPO_ROOT / "docker-compose.cpu.yml").read_text()
