"""The README's ``.env`` for a worker host (section "Many hosts", step 3) starts a worker: no API keys,
the main host's Redis over TLS with its password, the main host's object store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REDIS_SERVER, REPO_ROOT, SeaweedServer, free_port, wait_for_port

README = REPO_ROOT / "README.md"


def readme_block(start: str, language: str, first_line: str) -> str:
    section = README.read_text()[README.read_text().index(start):]
    block = re.search(rf"```{language}\n(\s*{re.escape(first_line)}.*?)```", section, re.S)
    assert block is not None, f"README: the {language} block after {start!r} starting with {first_line!r}"
    return block.group(1)


def test_the_readme_worker_host_env_starts_a_worker(tmp_path: Path, s3_server: SeaweedServer) -> None:
    import redis

    from jobstore.contract import worker_key

    # The main host: a certificate as the README makes it (its name: localhost here), Redis on TLS with
    # a password, and an object store with a bucket.
    certs = readme_block("### Many hosts", "bash", "mkdir -p tls")
    made = subprocess.run(["bash", "-ec", certs.replace("main-host.example", "localhost")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    tls, port, password = tmp_path / "tls", free_port(), "main-host-redis-password"
    server = subprocess.Popen(
        [REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--requirepass", password, "--tls-cert-file", str(tls / "redis.crt"), "--tls-key-file",
         str(tls / "redis.key"), "--tls-ca-cert-file", str(tls / "ca.crt"), "--tls-auth-clients", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    s3_server.create_bucket("urae")
    endpoint = s3_server.endpoint_url.removeprefix("http://")
    # The worker host: the README's .env with the placeholders filled in, nothing else.
    env_text = (readme_block("### Many hosts", "ini", "URAE_REDIS_URL=")
                .replace("<REDIS_PASSWORD>", password)
                .replace("main-host.example:6380", f"localhost:{port}")
                .replace("/tls/ca.crt", str(tls / "ca.crt"))
                .replace("http://main-host.example:9000", f"http://{endpoint}")
                .replace("AWS_ACCESS_KEY_ID=urae", f"AWS_ACCESS_KEY_ID={s3_server.env('urae')['AWS_ACCESS_KEY_ID']}")
                .replace("<MINIO_ROOT_PASSWORD>", s3_server.env("urae")["AWS_SECRET_ACCESS_KEY"])
                .replace("<token>", "hf_unused"))
    assert "<" not in env_text, env_text
    assert "URAE_API_KEY" not in env_text and "URAE_ADMIN_KEY" not in env_text
    host = tmp_path / "worker-host"
    host.mkdir()
    (host / ".env").write_text(env_text)
    # What compose puts into the environment: the .env (for AWS_*: boto3 reads them from the
    # environment, not from the file) and no URAE_* of this test process; CPU instead of CUDA.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("URAE_", "AWS_"))}
    env.update(line.split("=", 1) for line in env_text.splitlines() if line.startswith("AWS_"))
    env["PYTHONUNBUFFERED"] = "1"
    name = "gpu-host-2-gpu0-1"
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", "--name", name, "--model", "tiny", "--device", "cpu",
         "--dtype", "float32"], cwd=host, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        url = f"rediss://:{password}@localhost:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={tls / 'ca.crt'}"
        conn = redis.Redis.from_url(url)
        deadline = time.monotonic() + 180
        while not conn.exists(worker_key(name)):
            if worker.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the worker did not start (exit {worker.poll()}):\n"
                            + (tmp_path / "worker.log").read_text(errors="replace")[-3000:])
            time.sleep(0.2)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()
        server.terminate()
        server.wait(timeout=10)
