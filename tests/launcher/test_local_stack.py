"""The one-command local stack: start ``urae-serve`` on free ports, run a job over HTTP, Ctrl-C, nothing left."""

from __future__ import annotations

import io
import os
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import free_port
from tests.deploy.stack_process import StackProcess, child_pids, process_exists, wait_ready


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_one_command_serves_a_job_and_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    port = free_port()
    stack = StackProcess(["--port", str(port), "--data-dir", str(tmp_path / "data"), "--workers", "1",
                          "--finetune-workers", "1"])
    try:
        ready_line = stack.wait_for_line("urae-serve: ready")
        key = stack.api_key()
        assert f"http://127.0.0.1:{port}/#key={key}" in stack.output
        children = child_pids(stack.proc.pid)
        commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in children}
        assert sum("redis-server" in c for c in commands.values()) == 1, commands
        assert sum("service.app" in c for c in commands.values()) == 1, commands
        # A worker's command line, or the title RQ gives its process where setproctitle is installed.
        def workers(queue: str) -> int:
            return sum(f"--queues {queue}" in c or ("rq:worker:" in c and f"urae-{queue}" in c)
                       for c in commands.values())

        assert workers("generate") == 1, commands
        assert workers("finetune") == 1, commands
        assert any("-m webhooks" in c for c in commands.values()), commands  # (and its RQ scheduler)
        assert "webhooks    signed with whsec_" in stack.output

        base = f"http://127.0.0.1:{port}"
        body = wait_ready(base, key)
        assert body["model"] == "mini" and body["live_workers"] == 1, ready_line
        # The generated key is the only way in.
        assert httpx.get(f"{base}/ready", timeout=5).status_code == 401

        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
            submitted = http.post("/generate", json={"prompt": "a red fox", "width": 96, "height": 64, "steps": 2, "seed": 3})
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            deadline = time.monotonic() + 60
            job = submitted.json()
            while job["status"] not in ("finished", "failed", "canceled") and time.monotonic() < deadline:
                time.sleep(0.1)
                job = http.get(f"/jobs/{job_id}").json()
            assert job["status"] == "finished", job
            image = http.get(job["links"]["images"][0])
            assert image.status_code == 200
            assert Image.open(io.BytesIO(image.content)).size == (96, 64)
        # The result lies in the data directory the command announced.
        assert list((tmp_path / "data" / "storage" / "jobs" / job_id).glob("0.png"))
        redis_port = int(stack.wait_for_line("Redis").split("127.0.0.1:")[1].split("/")[0])
        assert port_open(redis_port) and port_open(port)

        assert stack.interrupt() == 0, stack.output
        assert "urae-serve: stopped" in stack.output
        left = {pid: commands[pid] for pid in children if process_exists(pid)}
        assert not left, f"still running after Ctrl-C: {left}"
        assert not port_open(port) and not port_open(redis_port)
        # Redis kept its data on disk (append-only file) for the next start.
        assert list((tmp_path / "data" / "redis").rglob("*.aof"))
    finally:
        stack.kill()


def test_a_busy_port_is_refused_in_one_line_and_nothing_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stack = StackProcess(["--port", str(port), "--data-dir", str(tmp_path / "data")])
        code = stack.proc.wait(timeout=30)
        stack.interrupt()
    assert code == 1
    assert f"urae-serve: port {port} on 127.0.0.1 is in use" in stack.output
    assert "Traceback" not in stack.output
    assert not (tmp_path / "data" / "redis").exists()


def test_without_redis_server_it_says_how_to_get_one(tmp_path: Path) -> None:
    # Only the virtual environment on PATH: no redis-server to be found.
    stack = StackProcess(["--port", str(free_port()), "--data-dir", str(tmp_path / "data")],
                         env={"PATH": str(Path(sys.executable).parent)})
    code = stack.proc.wait(timeout=30)
    stack.interrupt()
    assert code == 1
    assert "redis-server not found: install it (apt-get install redis-server) or set URAE_REDIS_URL" in stack.output
    assert "Traceback" not in stack.output
    assert os.listdir(tmp_path / "data" / "logs") == []


def test_a_bad_setting_is_refused_in_one_line_before_anything_starts(tmp_path: Path) -> None:
    stack = StackProcess(["--port", str(free_port()), "--data-dir", str(tmp_path / "data")],
                         env={"URAE_MAX_QUEUE_DEPTH": "0"})
    code = stack.proc.wait(timeout=30)
    stack.interrupt()
    assert code == 1
    assert "urae-serve: invalid setting URAE_MAX_QUEUE_DEPTH: Input should be greater than or equal to 1" in stack.output
    assert "Traceback" not in stack.output
    assert not (tmp_path / "data" / "redis").exists()


def test_open_access_is_explicit_and_announced(tmp_path: Path) -> None:
    from launcher.local_stack import LocalStack, StackOptions, parse_args

    options = parse_args(["--open-access", "--data-dir", str(tmp_path)])
    stack = LocalStack(options, out=io.StringIO())
    env = stack._service_env()
    stack._check_settings(env)  # the API and workers will accept this configuration
    assert env["URAE_ENV"] == "development" and env["URAE_DEV_OPEN_ACCESS"] == "true" and env["URAE_API_KEYS"] == ""
    stack.redis_url = "redis://127.0.0.1:6379/0"
    stack.announce(1.0)
    text = stack.out.getvalue()  # type: ignore[attr-defined]
    assert "OPEN DEVELOPMENT MODE: no API key, every request is accepted" in text and "#key=" not in text
    # Without the flag a key is generated: never open by default.
    default = LocalStack(StackOptions(data_dir=tmp_path))
    assert default._service_env()["URAE_API_KEYS"] == default.api_key and default.api_key
    # A real model defaults to the GPU in bfloat16; mini (the default) and tiny to the CPU in float32.
    gpu = parse_args(["--model", "black-forest-labs/FLUX.1-dev"])
    assert (gpu.resolved_device, gpu.resolved_dtype) == ("cuda", "bfloat16")
    assert (options.resolved_device, options.resolved_dtype) == ("cpu", "float32")


def test_each_generation_worker_gets_its_own_gpu(tmp_path: Path) -> None:
    from launcher.local_stack import LocalStack, LocalStackError, parse_args

    stack = LocalStack(parse_args(["--model", "black-forest-labs/FLUX.1-dev", "--workers", "2"]))
    assert stack._gpu_ids({}) == ["0", "1"]
    assert stack._gpu_ids({"CUDA_VISIBLE_DEVICES": "2, 5,7"}) == ["2", "5"]
    with pytest.raises(LocalStackError, match="--workers 2 needs 2 GPUs; CUDA_VISIBLE_DEVICES lists 1"):
        stack._gpu_ids({"CUDA_VISIBLE_DEVICES": "3"})
    assert LocalStack(parse_args(["--workers", "2"]))._gpu_ids({"CUDA_VISIBLE_DEVICES": "0"}) == []  # mini on CPU
