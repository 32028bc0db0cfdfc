"""The README stays true: its API walkthrough runs as written, every other command is run here or by CI,
and its settings table lists every setting with its real default."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from jobstore.settings import Settings
from tests.conftest import REPO_ROOT
from tests.deploy.conftest import ServedStack

README = (REPO_ROOT / "README.md").read_text()
CI_SCRIPT = (REPO_ROOT / ".ci" / "run").read_text()
LOCK = (REPO_ROOT / "requirements.lock").read_text()
WALKTHROUGH_HEADING = "## The API by example"

# Every README command outside the walkthrough, and where it is exercised. "ci": .ci/run runs it (checked
# below); "test": a test in this file runs it; the rest name the test that runs its equivalent.
EXERCISED = {
    "urae-serve": "tests/launcher/test_local_stack.py (python -m launcher.local_stack, the script's target)",
    # The GPU host's two commands: the container tests run them on a checkout copy (the .env edited as a
    # user would, docker-compose.cpu.yml added for an engine without GPUs).
    "cp .env.example .env": "tests/deploy/test_containers.py",
    "docker compose --profile finetune up -d --build": "tests/deploy/test_containers.py",
    "python3 -m venv .venv && . .venv/bin/activate": "ci",
    # CI has no internet: .ci/run installs the lock's torch pin from the machine's local disk (checked
    # below); the extra index is PyTorch's CPU wheel index.
    "pip install -c requirements.lock torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu":
        "ci: the lock's torch pin",
    'pip install -c requirements.lock -e ".[dev,train,gpu]"': "ci",
    # They rewrite the lock from the package index: run by hand when pyproject.toml changes;
    # tests/deploy/test_compose.py checks the lock they write (its header, every dependency pinned).
    "bash docker/refresh-lock.sh": "tests/deploy/test_compose.py (the lock it writes)",
    "bash docker/refresh-lock.sh --upgrade": "tests/deploy/test_compose.py (the lock it writes)",
    'urae generate "three yellow triangles in a row on a black background" --model mini -o triangles.png': "test",
    'urae generate "two blue squares and a red circle on a checkered background" --model mini --preset 4k -o big.png':
        "test",
    # 2048 px on a CPU: ~15 s alone, much longer on busy cores, so a slow test (python -m pytest -m slow).
    'urae generate "a lighthouse on a cliff at dusk" --model tiny --preset 2k --steps 4 -o lighthouse.png': "test",
    'urae generate "two red circles on a white background" --model mini --seed 5 -o draft.png': "test",
    "urae refine draft.png --preset 4k": "tests/urae/test_cli.py::test_generate_from_an_image_and_refine_a_draft",
    "python -m pytest": "ci",
    # Many hosts: the certificate commands run as written (host name replaced) and a rediss:// client
    # reaches a TLS Redis with the result; the compose files are checked without a Docker engine.
    "mkdir -p tls && cd tls": "tests/deploy/test_compose.py::test_a_rediss_url_reaches_a_tls_redis_with_its_password",
    'openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -subj "/CN=urae-ca" -days 3650':
        "tests/deploy/test_compose.py::test_a_rediss_url_reaches_a_tls_redis_with_its_password",
    'openssl req -newkey rsa:2048 -nodes -keyout redis.key -out redis.csr -subj "/CN=main-host.example"':
        "tests/deploy/test_compose.py::test_a_rediss_url_reaches_a_tls_redis_with_its_password",
    'printf "subjectAltName=DNS:main-host.example\\n" > san.ext':
        "tests/deploy/test_compose.py::test_a_rediss_url_reaches_a_tls_redis_with_its_password",
    "openssl x509 -req -in redis.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out redis.crt -days 3650 -extfile san.ext":
        "tests/deploy/test_compose.py::test_a_rediss_url_reaches_a_tls_redis_with_its_password",
    "chmod 644 redis.key && cd ..": "tests/deploy/test_compose.py::test_a_rediss_url_reaches_a_tls_redis_with_its_password",
    "docker compose -f docker-compose.yml -f docker-compose.s3.yml -f docker-compose.redis-tls.yml up -d --build":
        "no Docker engine here: tests/deploy/test_compose.py merges and checks the three files",
    # The container tests as CI runs them.
    "export DOCKER_HOST=$(bash docker/engine.sh start)": "ci",
    "PYTHON=/usr/bin/python3.11 bash docker/prepare-wheelhouse.sh": "ci",
    "URAE_REQUIRE_CONTAINERS=1 python -m pytest -m containers": "ci",
    "bash docker/engine.sh stop": "ci: on exit",
}


def bash_blocks(text: str) -> list[tuple[str, str]]:
    """(heading of the section, body) of every ```bash block."""
    blocks = []
    for match in re.finditer(r"```bash\n(.*?)```", text, re.S):
        heading = [h for h in re.findall(r"^#+ .*$", text[: match.start()], re.M)][-1]
        blocks.append((heading, match.group(1)))
    return blocks


def commands(block: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", block)
    # A comment after a command is for the reader: " # " ends the command.
    lines = [re.sub(r"\s+# .*$", "", line).strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_every_readme_command_is_run_by_a_test_or_by_ci() -> None:
    outside = [c for heading, body in bash_blocks(README) if not heading.startswith(WALKTHROUGH_HEADING)
               for c in commands(body)]
    unexercised = [c for c in outside if c not in EXERCISED]
    assert not unexercised, f"README commands that nothing runs: {unexercised}"
    ci_lines = {re.sub(r"^python -m pip install -q", "pip install", line.strip()) for line in CI_SCRIPT.splitlines()}
    for command, where in EXERCISED.items():
        assert command in outside, f"{command!r} is no longer in the README: drop it here"
        if where == "ci":
            for part in command.split(" && "):
                assert part in ci_lines, f"{part!r} is not in .ci/run"
        elif where == "ci: the lock's torch pin":
            pin = re.search(r"torch==\S+", command)
            assert pin is not None and re.search(rf"^{re.escape(pin.group(0))}$", LOCK, re.M), \
                f"{command!r}: the lock pins another torch"
            assert """pip install -c requirements.lock "$(grep -E '^torch==' requirements.lock)\"""" in ci_lines
        elif where == "ci: on exit":
            assert re.search(rf"^trap '.*{re.escape(command)} \|\| true' EXIT$", CI_SCRIPT, re.M), \
                f"{command!r}: .ci/run does not run it on exit"
    # The console script the quickstart names is the local stack that test_local_stack runs.
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["urae-serve"] == "launcher.local_stack:main"
    assert "urae-serve --model black-forest-labs/FLUX.1-dev --workers 2" in README


# The image each README generation command makes: the size its text promises (mini's presets are
# scaled to it: no size 128 px, 4k 512 px).
GENERATED_SIZES = {"draft.png": (128, 128), "triangles.png": (128, 128), "big.png": (512, 512), "lighthouse.png": (2048, 2048)}


def _generation_commands() -> list[Any]:
    found = [c for c, where in EXERCISED.items() if c.startswith("urae generate") and where == "test"]
    # The 2048 px tiny image (see EXERCISED) and mini's 512 px one (20 steps: 30-90 s on 2 busy cores)
    # are slow tests.
    return [pytest.param(c, id=c.rsplit(" -o ", 1)[1], marks=[pytest.mark.slow] if "--preset" in c else [])
            for c in found]


@pytest.mark.parametrize("command", _generation_commands())
def test_readme_cpu_generation_command_makes_the_image(command: str, tmp_path: Path) -> None:
    out = command.rsplit(" -o ", 1)[1]
    result = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / out) as image:
        assert image.size == GENERATED_SIZES[out]


def test_every_test_the_table_cites_exists() -> None:
    """An EXERCISED entry is CI, a test of this file, or cites test files (and test functions) that exist."""
    run_here = {c for c, where in EXERCISED.items() if where == "test"}
    assert run_here == {c for c in EXERCISED if c.startswith("urae generate")}, "no test here runs these"
    for command, where in EXERCISED.items():
        if where == "test" or where == "ci" or where.startswith("ci: "):
            continue
        cited = re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", where)
        assert cited, f"{command!r}: {where!r} names no test file"
        for path, name in cited:
            assert (REPO_ROOT / path).is_file(), f"{command!r}: {path} does not exist"
            if name:
                tree = ast.parse((REPO_ROOT / path).read_text())
                defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
                assert name in defined, f"{command!r}: {path} has no test {name}"


def test_readme_help_flags_are_the_real_ones() -> None:
    result = subprocess.run([sys.executable, "-m", "launcher.local_stack", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    for flag in re.findall(r"`(--[a-z-]+)`", README.split("### A GPU host with Docker")[0]):
        assert flag in result.stdout, f"README names {flag}, which urae-serve does not have"


def _walkthrough() -> str:
    blocks = [body for heading, body in bash_blocks(README) if heading.startswith(WALKTHROUGH_HEADING)]
    assert len(blocks) == 1
    return blocks[0]


def test_the_api_walkthrough_runs_as_written(served_stack: ServedStack, tmp_path: Path) -> None:
    script = _walkthrough()
    first, rest = script.split("\n", 1)
    assert first == "export API=http://127.0.0.1:8000 KEY=paste-the-key-urae-serve-printed"
    # Every endpoint of the API appears in it.
    for route in ("/health", "/ready", "/metrics", "/generate", "/jobs/$JOB", "/jobs/$JOB/events", "/jobs/$JOB/refine",
                  "/jobs/$JOB/images/0", "-X DELETE", "/adapters", "/adapters/urae-2k", "/adapters/my-style",
                  "/finetune"):
        assert route in rest, route
    # The LoRA it uploads comes from its own `urae builtin` line (the stack serves tiny); the dataset
    # is made here.
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as archive:
        for i, color in enumerate(("red", "blue")):
            png = io.BytesIO()
            # The default recipe trains at 2048 px and needs images of at least 1024 px.
            Image.new("RGB", (1024, 768), color).save(png, "PNG")
            archive.writestr(f"photo{i}.png", png.getvalue())
            archive.writestr(f"photo{i}.txt", f"a {color} square")

    script = f"set -euo pipefail\nexport API={served_stack.base_url} KEY={served_stack.api_key}\n{rest}"
    # The commands as a user of the installed project runs them: `urae` on the PATH, the served model.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "URAE_MODEL": "tiny"}
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                            env=env)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    out = result.stdout
    assert '{"status":"ok"}' in out and '"status":"ready"' in out
    assert "urae_queue_depth{" in out
    assert "event: progress" in out and '"status": "finished"' in out
    with Image.open(tmp_path / "fox.png") as image:
        assert image.size == (256, 256)
    refined = json.loads((tmp_path / "refined.json").read_text())
    assert refined["kind"] == "generate" and refined["status"] in ("queued", "started", "finished")
    assert out.count('"kind":"generate"') >= 4  # the two image-to-image jobs and the refine were queued too
    assert '"name":"my-style"' in out and '"builtin":false' in out
    assert '"kind":"finetune"' in out
    # The fine-tune job really runs (the dataset passes its checks), then no training is left running
    # on the shared stack's CPU.
    train_id = json.loads((tmp_path / "train.json").read_text())["id"]
    headers = {"Authorization": f"Bearer {served_stack.api_key}"}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        train = httpx.get(f"{served_stack.base_url}/jobs/{train_id}", headers=headers, timeout=10).json()
        if train["status"] != "queued" and train["progress"] is not None or train["status"] == "failed":
            break
        time.sleep(0.2)
    assert train["status"] in ("started", "finished"), train
    httpx.delete(f"{served_stack.base_url}/jobs/{train_id}", headers={"Authorization": f"Bearer {served_stack.api_key}"},
                 timeout=10)


def _default_cell(value: object) -> str:
    if value is None:
        return "(none)"
    if value == "":
        return "(empty)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def test_the_settings_table_lists_every_setting_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `(URAE_[A-Z0-9_]+)` \| ([^|]+) \|", README, re.M))
    expected = {f"URAE_{name.upper()}": _default_cell(field.default) for name, field in Settings.model_fields.items()}
    missing = sorted(set(expected) - set(rows))
    assert not missing, "add to the README's settings table:\n" + "\n".join(
        f"| `{n}` | {expected[n]} | ... |" for n in missing)
    assert not set(rows) - set(expected) - {"URAE_MODEL"}, "the table lists settings that do not exist"
    for name, cell in expected.items():
        assert rows[name].strip() == cell, f"{name}: README says {rows[name].strip()}, Settings says {cell}"


def test_the_library_example_runs_as_written(tmp_path: Path) -> None:
    block = re.search(r"## The library and its command line.*?```python\n(.*?)```", README, re.S)
    assert block is not None
    result = subprocess.run([sys.executable, "-c", block.group(1)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "denoise 2 2" in result.stdout
    with Image.open(tmp_path / "lighthouse.png") as image:
        assert image.size == (2736, 1536)  # 16:9 at the 2K pixel budget
