"""Nothing is read before authentication: a huge body without a key is refused at once, with real
uvicorn, and neither the API's memory nor its temporary folder grows."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import ApiServer

MB = 1024 * 1024


@pytest.fixture(scope="module")
def temp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api-tmp")


@pytest.fixture(scope="module")
def api(service_env: dict[str, str], temp_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    # Starlette spools multipart uploads to TMPDIR: point it at a folder this test watches.
    server = ApiServer({**service_env, "TMPDIR": str(temp_dir)}, tmp_path_factory.mktemp("api") / "api.log")
    yield server
    server.stop()


def bytes_under(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def send_body(port: int, path: str, content_type: str, prefix: bytes, total: int, headers: str = "") -> tuple[bytes, float, int]:
    """POST ``total`` bytes (``prefix`` then zeros) as fast as the server takes them; stop as soon as
    an answer arrives. Returns the answer's first bytes, the seconds until it came, and the bytes sent."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: {total}\r\n{headers}\r\n").encode())
    sock.setblocking(False)
    chunk = b"\0" * MB
    pending = prefix
    sent, answer = 0, b""
    start = time.monotonic()
    try:
        while time.monotonic() - start < 60:
            readable, writable, _ = select.select([sock], [sock] if sent < total else [], [], 5)
            if readable:
                data = sock.recv(65536)
                answer += data
                if not data or b"\r\n\r\n" in answer:
                    break
            if writable:
                if not pending:
                    pending = chunk[: total - sent]
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += n
                pending = pending[n:]
        return answer, time.monotonic() - start, sent
    finally:
        sock.close()


def multipart_prefix(field: str) -> tuple[str, bytes]:
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbig\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"adapter_name\"\r\n\r\nbig\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"x.bin\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return f"multipart/form-data; boundary={boundary}", head


CASES = {
    "adapters": ("/adapters", "file", 500 * MB),
    "finetune": ("/finetune", "dataset", 500 * MB),
    "generate": ("/generate", None, 50 * MB),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("authorization", ["", "Authorization: Bearer wrong-key\r\n"])
def test_a_huge_body_without_a_valid_key_gets_401_at_once_and_costs_nothing(
    api: ApiServer, temp_dir: Path, service_env: dict[str, str], case: str, authorization: str
) -> None:
    path, field, total = CASES[case]
    if field is None:
        content_type, prefix = "application/json", b'{"prompt": "' + b"a" * MB
    else:
        content_type, prefix = multipart_prefix(field)
    process = psutil.Process(api.proc.pid)
    uploads = Path(service_env["URAE_STORAGE_DIR"]) / "uploads"
    rss_before, temp_before = process.memory_info().rss, bytes_under(temp_dir)

    answer, seconds, sent = send_body(api.port, path, content_type, prefix, total, authorization)

    rss_growth = process.memory_info().rss - rss_before
    temp_growth = bytes_under(temp_dir) - temp_before
    print(f"\n{path} ({total // MB} MB, {'no key' if not authorization else 'wrong key'}): {answer[:12].decode()} "
          f"after {seconds * 1000:.1f} ms, {sent / MB:.1f} MB sent, RSS +{rss_growth / MB:.2f} MB, "
          f"TMPDIR +{temp_growth} bytes")
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"www-authenticate: bearer" in answer.lower()
    assert seconds < 2.0, f"the 401 took {seconds:.2f} s"
    assert sent < total  # answered while the body was still arriving
    assert rss_growth < 5 * MB, f"the API grew by {rss_growth / MB:.1f} MB"
    assert temp_growth < MB
    assert not uploads.exists() or bytes_under(uploads) == 0
    # The server is still there, and quick.
    t0 = time.monotonic()
    assert httpx.get(f"{api.url}/health", timeout=5).status_code == 200
    assert time.monotonic() - t0 < 1.0


def test_public_routes_need_no_key_and_the_rest_do(api: ApiServer) -> None:
    with httpx.Client(base_url=api.url, timeout=10) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/").status_code == 200
        assert client.get("/playground/playground.js").status_code == 200
        refused: dict[str, Any] = {
            "GET /jobs/x": client.get("/jobs/" + "0" * 32),
            "GET /adapters": client.get("/adapters"),
            "GET /datasets": client.get("/datasets"),
            "DELETE /datasets/x": client.delete("/datasets/x"),
            "GET /metrics": client.get("/metrics"),
            "POST /generate": client.post("/generate", json={"prompt": "x"}),
        }
        for route, response in refused.items():
            assert response.status_code == 401, route
            assert response.json()["detail"].startswith("missing Authorization header"), route
