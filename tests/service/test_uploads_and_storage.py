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


def queued_work(settings: Any) -> tuple[int, int, list[str]]:
    """What a refused upload must not leave behind: jobs in the adapter-import queue, job records,
    uploaded files in storage."""
    import redis
    from rq import Queue

    from jobstore.contract import ADAPTER_IMPORT_QUEUE, job_key

    conn = redis.Redis.from_url(settings.redis_url)
    try:
        queued = Queue(ADAPTER_IMPORT_QUEUE, connection=conn).count
        records = sum(1 for _ in conn.scan_iter(match=job_key("*")))
    finally:
        conn.close()
    uploads = sorted(str(p) for p in (Path(settings.storage_dir) / "uploads").rglob("*") if p.is_file())
    return queued, records, uploads


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"\x80\x04pickle", "pickle"),
        (safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\x00" * 8), "outside"),
    ],
)
def test_adapter_upload_with_a_bad_header_queues_nothing(client: Any, settings: Any, content: bytes, words: str) -> None:
    before = queued_work(settings)
    files = {"file": ("a.safetensors", content, "application/octet-stream")}
    response = client.post("/adapters", files=files, data={"name": "evil"})
    assert response.status_code == 422 and words in response.json()["detail"]
    assert client.get("/adapters/evil").status_code == 404
    # Nothing queued, no job record, no stored upload: the header is checked before any of them.
    assert queued_work(settings) == before


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x02", "not a safetensors file: shorter than its 8-byte header length"),
        (b"\x80\x04\x95rest-of-a-pickle",
         "not a safetensors file: this looks like a pickle/.bin checkpoint, which is never loaded"),
        (struct.pack("<Q", 0), "not a safetensors file: header length 0 does not fit a 8-byte file"),
        (struct.pack("<Q", 100) + b"{}" + b" " * 10, "not a safetensors file: header length 100 does not fit a 20-byte file"),
        # A length with its top bit set is a huge number, never a negative one.
        (b"\x00" * 7 + b"\xff",
         "safetensors header length 18374686479671623680 is over the 8388608 bytes an adapter's header may have"),
    ],
)
def test_safetensors_length_refusals_say_exactly_why(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(UploadError) as info:
        check_safetensors(path)
    assert str(info.value) == message


@pytest.mark.parametrize("length", [1, 8 * 1024 * 1024])
def test_header_lengths_at_the_bounds_are_read(tmp_path: Path, length: int) -> None:
    """1 byte and exactly the 8 MiB limit are lengths a file may declare: its JSON is what is judged."""
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", length) + b"{" + b" " * (length - 1))
    with pytest.raises(UploadError) as info:
        check_safetensors(path)
    assert "not JSON" in str(info.value) and "header length" not in str(info.value)


def test_copy_bounded_takes_exactly_the_limit_and_counts_across_chunks() -> None:
    from service.uploads import copy_bounded

    data = bytes(range(256)) * 6000  # 1.5 MB: two reads of 1 MiB
    out = io.BytesIO()
    assert copy_bounded(io.BytesIO(data), out, len(data), "the dataset") == len(data)
    assert out.getvalue() == data
    with pytest.raises(UploadError) as info:
        copy_bounded(io.BytesIO(data), io.BytesIO(), len(data) - 1, "the dataset")
    assert str(info.value) == f"the dataset is larger than the limit of {len(data) - 1} bytes"
    # Each read alone is under this limit; the two together are not.
    with pytest.raises(UploadError):
        copy_bounded(io.BytesIO(data), io.BytesIO(), 1_200_000, "the dataset")


def test_the_smallest_training_image_is_half_the_resolution() -> None:
    from service.uploads import min_image_long_side

    assert min_image_long_side(None, None) == 1024
    assert min_image_long_side("urae-2k", None) == 1024
    assert min_image_long_side("urae-4k", None) == 2048
    assert min_image_long_side("my-recipe", None) == 1024
    assert min_image_long_side("urae-4k", 1001) == 500 and isinstance(min_image_long_side(None, 1001), int)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a//b.png", "archive member 'a//b.png': not a plain relative path"),
        ("./a.png", "archive member './a.png': not a plain relative path"),
        ("/abs.png", "archive member '/abs.png': not a plain relative path"),
        ("%2e%2e/x.png", "archive member '%2e%2e/x.png': the name has characters that are not allowed"),
    ],
)
def test_bad_member_names_are_named_in_the_refusal(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(UploadError) as info:
        extract(tmp_path, make_zip({name: PNG}))
    assert str(info.value) == message


def test_folder_entries_of_a_zip_are_accepted(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo("ds/"), b"")
        archive.writestr("ds/a.png", PNG)
    assert [p.name for p in extract(tmp_path, buffer.getvalue()).iterdir()] == ["a.png"]


def image_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("a.JPG", PNG, "archive member 'a.JPG': not a JPEG image"),
        ("a.jpeg", PNG, "archive member 'a.jpeg': not a JPEG image"),
        ("a.WebP", PNG, "archive member 'a.WebP': not a WebP image"),
        ("a.webp", b"RIFF\x00\x00\x00\x00WAVEfmt ", "archive member 'a.webp': not a WebP image"),
        ("a.webp", b"RIFX\x00\x00\x00\x00WEBPVP8 ", "archive member 'a.webp': not a WebP image"),
        ("a.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "archive member 'a.png': not a readable image"),
    ],
)
def test_a_member_whose_bytes_are_not_its_suffix_is_refused_by_name(
    tmp_path: Path, name: str, data: bytes, message: str
) -> None:
    with pytest.raises(UploadError) as info:
        extract(tmp_path, make_zip({name: data}))
    assert str(info.value) == message


def test_real_jpeg_and_webp_members_of_any_suffix_case_are_accepted(tmp_path: Path) -> None:
    members = {"a.JPG": image_bytes("JPEG"), "b.jpeg": image_bytes("JPEG"), "c.WEBP": image_bytes("WEBP")}
    assert sorted(p.name for p in extract(tmp_path, make_zip(members)).iterdir()) == ["a.JPG", "b.jpeg", "c.WEBP"]


def test_zip_members_with_unix_modes_regular_files_pass_and_links_are_named(tmp_path: Path) -> None:
    def zip_with_mode(mode: int) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            info = zipfile.ZipInfo("a.png")
            info.external_attr = mode << 16
            archive.writestr(info, PNG)
        return buffer.getvalue()

    (tmp_path / "ok").mkdir()
    (tmp_path / "link").mkdir()
    assert [p.name for p in extract(tmp_path / "ok", zip_with_mode(0o100755)).iterdir()] == ["a.png"]
    with pytest.raises(UploadError) as info:
        extract(tmp_path / "link", zip_with_mode(0o120777))
    assert str(info.value) == "archive member 'a.png': only regular files are allowed (no links)"


def test_an_image_declaring_more_than_the_limit_is_refused_with_its_size(tmp_path: Path) -> None:
    """12000 x 12000 is above our 100 MP limit and below Pillow's own (178.9 MP): our check decides."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0)) + chunk(b"IDAT", b"")
    with pytest.raises(UploadError) as info:
        extract(tmp_path, make_zip({"big.png": b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b"")}))
    assert str(info.value) == (
        "archive member 'big.png': declares 12000x12000 pixels, more than 100000000; refused before decoding")
