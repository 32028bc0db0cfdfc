"""Hostile requests against the real API (uvicorn, Redis, no worker needed): keys, names and ids,
dataset archives. Each is refused with a 4xx that says why, and nothing lands outside the storage root."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import stat
import struct
import tarfile
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
from PIL import Image

from tests.conftest import API_KEY, auth, make_settings
from tests.reliability.conftest import SMALL, files_under


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (20, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


# A real image, its longer side as large as the default training resolution asks (1024 px).
PNG = png_bytes(1024, 8)
# Served without a key on purpose: liveness, and static files that hold no data (the playground page
# and its assets, the API's own description). Anything else must ask for a key.
PUBLIC_PATHS = {"/health", "/", "/playground/{name}", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
PATH_VALUES = {"job_id": "0" * 32, "name": "some-adapter", "index": "0"}


@pytest.fixture(scope="module")
def service_env(service_env: dict[str, str]) -> dict[str, str]:
    # Small archive limits, so a bomb is caught after megabytes, not gigabytes.
    return {**service_env, "URAE_MAX_DATASET_UNCOMPRESSED_BYTES": str(4 * 1024 * 1024), "URAE_MAX_DATASET_FILES": "50",
            "URAE_ADAPTER_IMPORT_WAIT_S": "0"}


def all_routes(settings: Any) -> list[tuple[str, str]]:
    from service.app import create_app

    out: list[tuple[str, str]] = []

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            included = getattr(route, "original_router", None)  # FastAPI >= 0.160 wraps included routers
            if included is not None:
                walk(included.routes, prefix + route.include_context.prefix)
                continue
            for method in sorted(getattr(route, "methods", None) or ()):
                if method not in ("HEAD", "OPTIONS"):
                    out.append((method, prefix + route.path))

    walk(create_app(settings).routes, "")
    return out


def raw_request(base_url: str, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> tuple[int, bytes]:
    """Send the path exactly as given (httpx would normalise ``..``)."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_every_route_but_the_public_ones_needs_a_valid_key(api_server: Any, service_env: dict[str, str]) -> None:
    routes = all_routes(make_settings(service_env))
    schema_paths = set(raw_json(api_server.url, "/openapi.json")["paths"])
    assert schema_paths <= {path for _, path in routes}  # the schema lists nothing the app lacks
    protected = [(m, p) for m, p in routes if p not in PUBLIC_PATHS]
    assert len(protected) >= 10
    stolen_hash = hashlib.sha256(API_KEY.encode()).hexdigest()
    bad_headers = [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {API_KEY}"},
                   {"Authorization": f"Bearer {stolen_hash}"}, {"Authorization": f"Bearer {API_KEY[:-1]}"},
                   {"Authorization": f"Bearer {API_KEY.upper()}"}, {"Authorization": "Bearer"}]
    for method, template in protected:
        path = template.format(**PATH_VALUES)
        for headers in bad_headers:
            status, body = raw_request(api_server.url, method, path, headers)
            assert status == 401, (method, path, headers, body[:200])
            assert json.loads(body)["detail"]
        status, _ = raw_request(api_server.url, method, path, auth())
        assert status != 401, (method, path)  # the same request with the key gets past authentication


def raw_json(base_url: str, path: str) -> Any:
    status, body = raw_request(base_url, "GET", path)
    assert status == 200
    return json.loads(body)


def test_the_api_key_is_never_stored_or_logged_in_plain(http: Any, api_server: Any, redis_url: str) -> None:
    response = http.post("/generate", json=SMALL, headers={"Idempotency-Key": "order-7"})
    assert response.status_code == 202
    assert http.get(f"/jobs/{response.json()['id']}").status_code == 200
    conn = redis.Redis.from_url(redis_url)
    secrets = (API_KEY.encode(), hashlib.sha256(API_KEY.encode()).hexdigest().encode())
    contents = redis_contents(conn)
    assert b"order-7" not in contents  # the client's idempotency key is stored hashed too
    assert SMALL["prompt"].encode() in contents and not any(secret in contents for secret in secrets)
    api_server.log.flush()
    assert API_KEY not in Path(api_server.log_path).read_text(errors="replace")
    assert http.delete(f"/jobs/{response.json()['id']}").status_code == 200


def redis_contents(conn: redis.Redis) -> bytes:
    """Every key and every value in Redis, as one byte string to search."""
    parts: list[bytes] = []
    for key in conn.scan_iter():
        kind = conn.type(key)
        parts.append(key)
        if kind == b"string":
            parts.append(conn.get(key) or b"")
        elif kind == b"hash":
            parts += [b for item in conn.hgetall(key).items() for b in item]
        elif kind == b"list":
            parts += conn.lrange(key, 0, -1)
        elif kind == b"set":
            parts += list(conn.smembers(key))
        elif kind == b"zset":
            parts += conn.zrange(key, 0, -1)
        elif kind == b"stream":
            parts += [b for _, fields in conn.xrange(key) for item in fields.items() for b in item]
    return b"\n".join(parts)


HOSTILE_NAMES = [
    "../../etc/passwd", "..", "/etc/passwd", "..%2f..%2fetc%2fpasswd", "%2e%2e", "%252e%252e%252f", "..\\..\\boot.ini",
    "%c0%ae%c0%ae%c0%af", "\uff0e\uff0e\uff0fetc", "caf\u00e9", "st\u0443le", "style\u200b", "a%00b", "A" * 32,
    ".hidden", "-rf", "x" * 65, "",
]


def _quoted(name: str) -> str:
    # Keep the attacker's ../ and %-sequences as they are; only non-ASCII needs escaping to be sent.
    return quote(name, safe="/%\\.:")


# An empty name is simply another route ("/adapters/" redirects to the list), so it is left out here.
@pytest.mark.parametrize("name", [n for n in HOSTILE_NAMES if n])
def test_hostile_names_and_ids_in_paths_get_4xx(api_server: Any, service_env: dict[str, str], name: str) -> None:
    storage = Path(service_env["URAE_STORAGE_DIR"])
    sentinel = storage.parent / "sentinel.txt"
    sentinel.write_text("keep")
    before = files_under(storage)
    paths = [("GET", f"/jobs/{_quoted(name)}"), ("GET", f"/jobs/{_quoted(name)}/events"),
             ("GET", f"/jobs/{_quoted(name)}/images/0"), ("DELETE", f"/jobs/{_quoted(name)}"),
             ("GET", f"/adapters/{_quoted(name)}"), ("DELETE", f"/adapters/{_quoted(name)}")]
    for method, path in paths:
        status, body = raw_request(api_server.url, method, path, auth())
        assert 400 <= status < 500 and status != 401, (method, path, status, body[:200])
    assert sentinel.read_text() == "keep"
    assert files_under(storage) == before


def tiny_safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\x00" * 8


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_in_bodies_get_4xx_naming_the_field(http: Any, name: str, redis_url: str) -> None:
    answers = {
        "name": http.post("/adapters", files={"file": ("a.safetensors", tiny_safetensors())}, data={"name": name}),
        "adapter_name": http.post("/finetune", data={"adapter_name": name, "dataset_name": "pets"}),
        "dataset_name": http.post("/finetune", data={"adapter_name": "fine", "dataset_name": name}),
        "adapters[0].name": http.post("/generate", json={**SMALL, "adapters": [{"name": name}]}),
    }
    for field, response in answers.items():
        assert response.status_code == 422, (field, response.text)
        # An empty form field counts as absent: then the answer is that no dataset was given.
        assert response.json()["field"] == ("dataset" if field == "dataset_name" and not name else field)
    conn = redis.Redis.from_url(redis_url)
    assert conn.hlen("urae:adapters") == 0


def zip_bytes(members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_symlink(name: str, target: str) -> bytes:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return zip_bytes([("ok.png", PNG), (info, target.encode())])


def tar_bytes(add: Any) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("ok.png")
        info.size = len(PNG)
        archive.addfile(info, io.BytesIO(PNG))
        add(archive)
    return buffer.getvalue()


def tar_member(name: str, kind: bytes, linkname: str = "", data: bytes = b"") -> Any:
    def add(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data) if data else None)

    return add


HOSTILE_ARCHIVES = {
    "zip bomb": (zip_bytes([("ok.png", PNG), ("evil-bomb.txt", b"a" * (40 * 1024 * 1024))]), "expands beyond"),
    "zip traversal": (zip_bytes([("ok.png", PNG), ("../../../../../../tmp/evil-traversal.png", PNG)]),
                      "plain relative path"),
    "zip absolute": (zip_bytes([("ok.png", PNG), ("/tmp/evil-absolute.png", PNG)]), "plain relative path"),
    "zip symlink": (zip_symlink("evil-link.png", "/etc/passwd"), "no links"),
    "zip executable": (zip_bytes([("ok.png", PNG), ("evil.sh", b"#!/bin/sh\nrm -rf /\n")]), "only images"),
    "zip fake image": (zip_bytes([("ok.png", PNG), ("evil.png", b"\x7fELF" + b"\x00" * 60)]), "not a PNG"),
    "zip in a zip": (zip_bytes([("ok.png", PNG), ("evil.zip", zip_bytes([("a.png", PNG)]))]), "only images"),
    "tar symlink": (tar_bytes(tar_member("evil-link.png", tarfile.SYMTYPE, "/etc/passwd")), "no links"),
    "tar hard link": (tar_bytes(tar_member("evil-hard.png", tarfile.LNKTYPE, "/etc/passwd")), "no links"),
    "tar device": (tar_bytes(tar_member("evil-dev.png", tarfile.CHRTYPE)), "no links"),
    "tar traversal": (tar_bytes(tar_member("../../../../../../tmp/evil-tar.png", tarfile.REGTYPE, data=PNG)),
                      "plain relative path"),
    "not an archive": (PNG, "neither a zip nor a tar"),
}


@pytest.mark.parametrize("case", list(HOSTILE_ARCHIVES))
def test_hostile_dataset_archives_are_refused_and_nothing_is_written(http: Any, service_env: dict[str, str],
                                                                     case: str) -> None:
    data, words = HOSTILE_ARCHIVES[case]
    storage = Path(service_env["URAE_STORAGE_DIR"])
    outside = storage.parent
    before_outside = files_under(outside) - {f"{storage.name}/{f}" for f in files_under(storage)}
    response = http.post("/finetune", files={"dataset": ("data.zip", data, "application/zip")},
                         data={"adapter_name": "evil", "dataset_name": "evil"})
    assert response.status_code in (413, 422), response.text
    assert response.json()["field"] == "dataset"
    assert words in response.json()["detail"]
    assert not (storage / "datasets" / "evil").exists()
    assert [f for f in files_under(storage) if "evil" in f or ".tmp-" in f] == []
    after_outside = files_under(outside) - {f"{storage.name}/{f}" for f in files_under(storage)}
    assert {f for f in after_outside - before_outside if "evil" in f} == set()
    assert not list(Path("/tmp").glob("evil-*"))


def test_a_safetensors_header_length_that_starts_like_a_pickle_is_not_called_one(http: Any) -> None:
    # A header of 384 bytes: its length field starts with 0x80, the pickle protocol marker.
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (384 - len(header))
    data = struct.pack("<Q", len(header)) + header + b"\x00" * 8
    assert data[:1] == b"\x80"
    response = http.post("/adapters", files={"file": ("a.safetensors", data)}, data={"name": "not-a-pickle"})
    assert "pickle" not in response.text
    assert response.status_code == 202, response.text  # passed the header check; a worker would convert it
    assert http.delete(response.headers["Location"]).status_code == 200
