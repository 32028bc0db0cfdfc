"""Dataset archives and adapter headers are checked without torch."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service.uploads import ArchiveLimits, UploadError, check_safetensors, extract_dataset


def png_bytes(width: int = 8, height: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = png_bytes()
LIMITS = ArchiveLimits(max_files=10, max_total_bytes=10_000)


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def extract(tmp_path: Path, data: bytes, limits: ArchiveLimits = LIMITS) -> Path:
    archive = tmp_path / "upload.bin"
    archive.write_bytes(data)
    dest = tmp_path / "root" / "datasets" / "ds"
    extract_dataset(archive, dest, limits)
    return dest


def test_a_good_zip_is_extracted_flat(tmp_path: Path) -> None:
    dest = extract(tmp_path, make_zip({"ds/a.png": PNG, "ds/a.txt": b"a cat", "ds/b.png": PNG, "ds/b.json": b"{}"}))
    assert sorted(p.name for p in dest.iterdir()) == ["a.png", "a.txt", "b.json", "b.png"]


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ({"../evil.png": PNG}, "plain relative path"),
        ({"/abs.png": PNG}, "plain relative path"),
        ({"a/../../x.png": PNG}, "plain relative path"),
        ({"a\\..\\x.png": PNG}, "plain relative path"),
        ({"%2e%2e/x.png": PNG}, "not allowed"),
        ({"caf\u00e9.png": PNG}, "not allowed"),
        ({"run.sh": b"#!/bin/sh"}, "only images and caption"),
        ({"fake.png": b"GIF89a" + b"\x00" * 20}, "not a PNG"),
        ({"a.txt": b"\xff\xfe\x00"}, "UTF-8"),
        ({"a/b/c.png": PNG}, "one folder"),
        ({"a.txt": b"caption only"}, "no images"),
    ],
)
def test_bad_zip_members_are_refused_and_nothing_is_written(tmp_path: Path, members: dict[str, bytes], words: str) -> None:
    with pytest.raises(UploadError, match=words):
        extract(tmp_path, make_zip(members))
    root = tmp_path / "root"
    assert not (root / "datasets" / "ds").exists()
    assert [p for p in root.rglob("*") if p.is_file()] == []
    assert not (tmp_path / "evil.png").exists()


def test_zip_bomb_is_stopped_by_the_bytes_actually_read(tmp_path: Path) -> None:
    bomb = make_zip({"big.txt": b"a" * 50_000})
    assert len(bomb) < 1000
    with pytest.raises(UploadError, match="expands beyond"):
        extract(tmp_path, bomb)


def test_too_many_files_are_refused(tmp_path: Path) -> None:
    members = {f"{i}.png": PNG for i in range(11)}
    with pytest.raises(UploadError, match="more than 10 files"):
        extract(tmp_path, make_zip(members))


def test_tar_with_a_symlink_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("a.png")
        info.size = len(PNG)
        archive.addfile(info, io.BytesIO(PNG))
        link = tarfile.TarInfo("b.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    with pytest.raises(UploadError, match="no links"):
        extract(tmp_path, buffer.getvalue())


def test_not_an_archive(tmp_path: Path) -> None:
    with pytest.raises(UploadError, match="neither a zip nor a tar"):
        extract(tmp_path, b"just some bytes")


def safetensors_bytes(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"\x80\x04\x95rest-of-a-pickle", "pickle"),
        (b"PK\x03\x04" + b"\x00" * 20, "pickle"),
        (b"\x01\x02", "shorter than"),
        (struct.pack("<Q", 1 << 40) + b"{}", "header length"),
        (struct.pack("<Q", 5) + b"nope!", "not JSON"),
        (safetensors_bytes({"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\x00" * 8), "dtype"),
        (safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\x00" * 8), "outside"),
        (safetensors_bytes({"__metadata__": {"a": "b"}}, b""), "no tensors"),
    ],
)
def test_safetensors_header_checks(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(UploadError, match=words):
        check_safetensors(path)


def test_a_valid_safetensors_header_passes(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\x00" * 8))
    assert check_safetensors(path).tensors == 1


def test_finetune_upload_of_a_bad_archive_is_422(client: Any) -> None:
    files = {"dataset": ("evil.zip", make_zip({"../../evil.png": PNG}), "application/zip")}
    response = client.post("/finetune", files=files, data={"adapter_name": "evil"})
    assert response.status_code == 422
    assert response.json()["field"] == "dataset"
    assert "plain relative path" in response.json()["detail"]


def test_adapter_upload_with_a_bad_header_queues_nothing(client: Any) -> None:
    files = {"file": ("a.safetensors", b"\x80\x04pickle", "application/octet-stream")}
    response = client.post("/adapters", files=files, data={"name": "evil"})
    assert response.status_code == 422 and "pickle" in response.json()["detail"]
    assert client.get("/adapters/evil").status_code == 404
