"""Input that the parsers themselves give up on: JSON nested deeper than the parser recurses, integers
longer than Python converts, damaged dataset archives, prompts with nothing visible in them, and
credentials in a webhook URL. Each is the client's problem, answered 4xx with the field at fault,
never a 500; a secret the client sent never comes back."""

from __future__ import annotations

import functools
import io
import json
import lzma
import random
import struct
import sys
import tarfile
import zipfile
import zlib
from typing import Any

import pytest
from fastapi import params
from fastapi.routing import APIRoute

from service.app import create_app
from tests.worker.test_finetune_flow import RECIPE, dataset_zip

GENERATE = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "priority": "low"}


def nested_list(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_object(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def hostile_json_values() -> dict[str, str]:
    """JSON texts ``json.loads`` cannot read although their syntax is fine."""
    return {
        "list 1001 deep": nested_list(1001),
        "list 7000 deep": nested_list(7000),
        "object 1500 deep": nested_object(1500),
        "integer of 4301 digits": "1" * 4301,
        "negative integer of 9000 digits": "-" + "7" * 9000,
    }


def json_body_routes(settings: Any) -> list[tuple[str, str]]:
    """Every (method, path) of the app whose body is JSON (a new one is covered without a change here)."""
    found: list[tuple[str, str]] = []

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            included = getattr(route, "original_router", None)  # FastAPI >= 0.160 wraps included routers
            if included is not None:
                walk(included.routes, prefix + route.include_context.prefix)
            elif isinstance(route, APIRoute) and route.body_field is not None:
                if not any(isinstance(p.field_info, params.Form) for p in route.dependant.body_params):
                    found.extend((method, prefix + route.path_format) for method in route.methods)

    walk(create_app(settings).routes, "")
    return found


@pytest.mark.parametrize("case", list(hostile_json_values()))
def test_json_bodies_the_parser_gives_up_on_are_422_naming_the_body(client: Any, settings: Any, case: str) -> None:
    value = hostile_json_values()[case]
    routes = json_body_routes(settings)
    assert ("POST", "/generate") in routes
    for method, path in routes:
        path = path.replace("{job_id}", "0" * 32)
        for body in (value, '{"prompt": "x", "adapters": ' + value + "}"):
            response = client.request(method, path, content=body, headers={"content-type": "application/json"})
            assert response.status_code == 422, (case, path, response.status_code, response.text[:200])
            assert response.json()["field"] == "body", (case, path, response.text[:200])
            assert response.json()["detail"].startswith("body: "), response.text[:200]


@pytest.mark.parametrize("depth", [33, 100, 1001])
def test_the_depth_bound_is_our_own_whatever_the_recursion_limit(client: Any, settings: Any, depth: int) -> None:
    """A library that raises the process's recursion limit (hypothesis does, in a test run) lets the
    parser go deeper: the bound that answers is MAX_JSON_DEPTH, the same in every process."""
    from service.json_bodies import MAX_JSON_DEPTH

    assert MAX_JSON_DEPTH == 32
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        for method, path in json_body_routes(settings):
            path = path.replace("{job_id}", "0" * 32)
            for body in (nested_list(depth), '{"prompt": "x", "adapters": ' + nested_list(depth - 1) + "}"):
                response = client.request(method, path, content=body, headers={"content-type": "application/json"})
                assert response.status_code == 422, (path, response.text[:200])
                assert response.json()["field"] == "body", (path, response.text[:200])
                assert "more than 32 levels" in response.json()["detail"], response.text[:200]
        response = client.post("/finetune", data={"adapter_name": "deep", "dataset_name": "nowhere",
                                                  "recipe": nested_object(depth)})
        assert response.status_code == 422 and response.json()["field"] == "recipe", response.text[:200]
        assert "more than 32 levels" in response.json()["detail"]
    finally:
        sys.setrecursionlimit(previous)


def test_json_within_the_depth_bound_reaches_the_requests_own_validation(client: Any) -> None:
    body = '{"prompt": "x", "adapters": ' + nested_list(31) + "}"  # 32 levels
    response = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["field"].startswith("adapters"), response.text[:200]


@pytest.mark.parametrize("case", list(hostile_json_values()))
def test_a_finetune_recipe_the_parser_gives_up_on_is_422_naming_the_recipe(client: Any, case: str) -> None:
    response = client.post("/finetune", data={"adapter_name": "deep", "dataset_name": "nowhere",
                                              "recipe": hostile_json_values()[case]})
    assert response.status_code == 422, response.text[:300]
    assert response.json()["field"] == "recipe"
    assert response.json()["detail"].startswith("recipe: ")


@pytest.mark.parametrize("recipe", ["[1, 2]", '"urae-2k"', "7", "null", "{oops}"])
def test_a_recipe_that_is_no_json_object_is_named(client: Any, recipe: str) -> None:
    response = client.post("/finetune", data={"adapter_name": "shape", "dataset_name": "nowhere", "recipe": recipe})
    assert response.status_code == 422 and response.json()["field"] == "recipe", response.text


# -- damaged archives ---------------------------------------------------------------------------------
PNG_NAME, CAPTION_NAME = "pets/cat.png", "pets/cat.txt"


def _valid_members() -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(dataset_zip())) as good:
        return {info.filename: good.read(info) for info in good.infolist() if not info.is_dir()}


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _patch_every_header(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    """Set a field at ``offset`` of every local (PK\\3\\4) and central (PK\\1\\2) zip header."""
    out = bytearray(data)
    for signature, base in ((b"PK\x03\x04", 0), (b"PK\x01\x02", 2)):
        at = out.find(signature)
        while at >= 0:
            struct.pack_into(fmt, out, at + base + offset, value)
            at = out.find(signature, at + 4)
    return bytes(out)


def _garble(data: bytes, at: int, length: int = 16) -> bytes:
    out = bytearray(data)
    for i in range(at, min(len(out), at + length)):
        out[i] ^= 0xA5
    return bytes(out)


# A caption of bytes no compressor shrinks, so a damaged stream fails deep inside, after its first headers.
NOISE = random.Random(7).randbytes(300_000)
LONG_TEXT = b"a caption that repeats " * 4000


def _corrupt_member_data(method: int) -> bytes:
    """A zip whose long member's compressed bytes are garbled (after its local header and name)."""
    data = _zip({**_valid_members(), "pets/long.txt": LONG_TEXT}, method)
    info = next(i for i in zipfile.ZipFile(io.BytesIO(data)).infolist() if i.filename == "pets/long.txt")
    return _garble(data, info.header_offset + 30 + len(info.filename) + len(info.extra) + 20)


def _tar(mode: str, first: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in {**(first or {}), **_valid_members()}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _cut_in_middle(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def _garble_at(data: bytes, fraction: float) -> bytes:
    return _garble(data, int(len(data) * fraction), 64)


@functools.cache
def damaged_archives() -> dict[str, bytes]:
    stored = _zip(_valid_members(), zipfile.ZIP_STORED)
    return {
        # general-purpose flag bit 0: "encrypted" (zipfile: RuntimeError, password required)
        "zip with an encrypted member": _patch_every_header(stored, 6, "<H", 0x1),
        # compression methods zipfile does not implement (NotImplementedError)
        "zip with deflate64 members": _patch_every_header(stored, 8, "<H", 9),
        "zip with PPMd members": _patch_every_header(stored, 8, "<H", 98),
        "zip with AES members": _patch_every_header(stored, 8, "<H", 99),
        # the right method, garbage data
        "zip with bad LZMA data": _corrupt_member_data(zipfile.ZIP_LZMA),
        "zip with bad deflate data": _corrupt_member_data(zipfile.ZIP_DEFLATED),
        "zip with bad bzip2 data": _corrupt_member_data(zipfile.ZIP_BZIP2),
        "zip cut in the middle": _cut_in_middle(_zip(_valid_members())),
        "tar.xz with bad data past its first headers": _garble_at(_tar("w:xz", {"pets/noise.txt": NOISE}), 0.9),
        "tar.xz cut in the middle": _cut_in_middle(_tar("w:xz", {"pets/noise.txt": NOISE})),
        "tar.xz garbled in the middle": _garble_at(_tar("w:xz"), 0.5),
        "tar.gz garbled past its first headers": _garble_at(_tar("w:gz", {"pets/noise.txt": NOISE}), 0.9),
        "tar.bz2 cut in the middle": _cut_in_middle(_tar("w:bz2", {"pets/noise.txt": NOISE})),
        "xz of random-looking bytes": lzma.compress(b"x")[:12] + bytes(range(256)) * 4,
        "gzip header then raw deflate garbage": b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"
        + zlib.compress(b"tar" * 999)[5:],
    }


@pytest.mark.parametrize("case", list(damaged_archives()))
def test_damaged_dataset_archives_are_422_with_a_reason(client: Any, case: str, settings: Any) -> None:
    from pathlib import Path

    archive = damaged_archives()[case]
    staging = Path(settings.storage_dir)
    before = {p for p in staging.rglob("*") if p.is_file()}
    response = client.post(
        "/finetune", files={"dataset": ("d.bin", archive, "application/octet-stream")},
        data={"adapter_name": "damaged", "dataset_name": "damaged-set", "recipe": json.dumps(RECIPE)},
    )
    assert response.status_code == 422, (case, response.status_code, response.text[:300])
    body = response.json()
    assert body["field"] == "dataset" and body["detail"], body
    assert client.get("/datasets/damaged-set").status_code == 404
    assert {p for p in staging.rglob("*") if p.is_file()} - before == set()  # nothing left behind


# -- prompts with nothing visible -----------------------------------------------------------------------
INVISIBLE = {
    "NULs": "\x00" * 10,
    "control characters": "".join(chr(c) for c in range(1, 32)) + "\x7f\x85",
    "zero-width characters": "\u200b\u200c\u200d\u2060\ufeff",
    "direction marks": "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
    "exotic spaces": "\u00a0\u1680\u2000\u2007\u200a\u2028\u2029\u202f\u205f\u3000",
    "fillers and blank glyphs": "\u3164\u115f\u1160\uffa0\u2800",
    "combining marks alone": "\u0301\u0308\u20dd",
    "tag characters": "".join(chr(0xE0000 + c) for c in (1, 0x41, 0x42, 0x7F)),
    "soft hyphens and variation selectors": "\u00ad\ufe0f\u034f",
    "a mix": " \x00\u200b\t\u3000\u2800\n",
}


@pytest.mark.parametrize("case", list(INVISIBLE))
def test_a_prompt_with_no_visible_character_is_blank(client: Any, case: str) -> None:
    response = client.post("/generate", json={**GENERATE, "prompt": INVISIBLE[case]})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "prompt" and "blank" in response.json()["detail"]


@pytest.mark.parametrize("prompt", ["x", "\x00a\x00", "\u200b\u732b", "\u2605", "1", "?", "\u0915\u094d"])
def test_a_prompt_with_one_visible_character_is_not_blank(client: Any, prompt: str) -> None:
    response = client.post("/generate", json={**GENERATE, "prompt": prompt})
    assert response.status_code == 202, response.text
    client.delete(f"/jobs/{response.json()['id']}")
