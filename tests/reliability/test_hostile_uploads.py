"""Upload parsers never answer 500: safetensors headers (fuzzed over JSON structures), archives with a
million members, images that declare absurd sizes, and dataset images too small to train on."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.uploads import (
    DEFAULT_TRAINING_RESOLUTION,
    MAX_HEADER_BYTES,
    SHIPPED_RECIPE_RESOLUTIONS,
    ArchiveLimits,
    UploadError,
    check_safetensors,
    extract_dataset,
    parse_safetensors_header,
)

# -- safetensors headers -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
# Entries that look like tensors, with every field sometimes of the wrong type or out of range.
tensor_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F16", "BF16", "F32", "I64", "f32", ""]) | json_values,
        "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 80), max_size=3) | json_values,
    },
)
headers = st.dictionaries(
    st.sampled_from(["__metadata__", "w", "a.lora_A.weight", ""]) | st.text(max_size=10),
    tensor_entries | json_values,
    max_size=5,
) | json_values


def accepted_or_refused(raw: bytes, data_size: int) -> Any:
    """The parser's answer: a summary, or its own UploadError; anything else fails the test."""
    try:
        return parse_safetensors_header(raw, data_size)
    except UploadError as exc:
        assert str(exc)
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=headers, data_size=st.integers(0, 96))
def test_any_json_header_is_accepted_or_refused_with_a_reason(header: Any, data_size: int) -> None:
    raw = json.dumps(header).encode()
    summary = accepted_or_refused(raw, data_size)
    if summary is not None:
        # Whatever passes is a file the safetensors library itself loads.
        from safetensors.torch import load

        load(struct.pack("<Q", len(raw)) + raw + b"\0" * data_size)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64), data_size=st.integers(0, 64))
def test_any_bytes_are_accepted_or_refused_with_a_reason(raw: bytes, data_size: int) -> None:
    accepted_or_refused(raw, data_size)


@settings(max_examples=100, deadline=None)
@given(tensors=st.lists(st.tuples(st.sampled_from(["F16", "BF16", "F32"]), st.lists(st.integers(0, 5), max_size=3)),
                        min_size=1, max_size=6),
       metadata=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
def test_headers_the_safetensors_library_writes_pass(tensors: list[tuple[str, list[int]]], metadata: dict[str, str]) -> None:
    import torch
    from safetensors.torch import save

    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    data = save({f"t{i}": torch.zeros(shape, dtype=dtypes[d]) for i, (d, shape) in enumerate(tensors)}, metadata or None)
    (length,) = struct.unpack("<Q", data[:8])
    summary = parse_safetensors_header(data[8 : 8 + length], len(data) - 8 - length)
    assert summary.tensors == len(tensors) and summary.metadata == metadata


@pytest.mark.parametrize(
    ("header", "data_size", "words"),
    [
        ("[" * 100_000 + "]" * 100_000, 0, "nested too deeply"),
        ('{"w": ' * 50_000 + "1" + "}" * 50_000, 0, "nested too deeply"),
        ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + "9" * 5000 + "]}}", 4, "not JSON"),
        ({"__metadata__": ["a", "b"], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 4, "__metadata__"),
        ({"__metadata__": {"a": {"b": 1}}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 4, "__metadata__"),
        ({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, 4, "dtype"),
        ({"w": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}, 4, "shape"),
        ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 4, "shape"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": {"a": 0}}}, 4, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, 8, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e3]}}, 4, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 4, "need 8"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlaps"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "gap"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 400, "file has 400 bytes"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "v": 3}, 4, "lacks dtype"),
    ],
)
def test_malformed_headers_name_the_problem(header: Any, data_size: int, words: str) -> None:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    with pytest.raises(UploadError, match=words):
        parse_safetensors_header(raw, data_size)


def test_a_header_far_larger_than_any_adapter_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    # The length says 64 MiB and the file holds it, but nothing past the 8 bytes may be read.
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 64 * 1024 * 1024))
        f.truncate(8 + 64 * 1024 * 1024)
    tracemalloc.start()
    with pytest.raises(UploadError, match=f"over the {MAX_HEADER_BYTES} bytes"):
        check_safetensors(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Reading the header would hold 64 MiB: the peak shows it was not read (no wall clock needed).
    assert peak < 1024 * 1024


def test_uploaded_malformed_headers_are_422s_naming_the_problem(http: Any) -> None:
    cases = {
        "deep": (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
        "meta": (json.dumps({"__metadata__": [1], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode(),
                 "__metadata__"),
        "shape": (json.dumps({"w": {"dtype": "F32", "shape": [[1]], "data_offsets": [0, 4]}}).encode(), "shape"),
    }
    for name, (raw, words) in cases.items():
        body = struct.pack("<Q", len(raw)) + raw + b"\0" * 4
        response = http.post("/adapters", files={"file": ("a.safetensors", body)}, data={"name": f"bad-{name}"})
        assert response.status_code == 422, response.text
        assert words in response.json()["detail"] and response.json()["field"] == "file"


# -- archives and images -----------------------------------------------------------------------------


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 160, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG signature and header chunk that declares width x height, with (almost) no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def million_member_tar_gz(path: Path, members: int = 1_000_000, damaged_after: int | None = None) -> None:
    """A tar.gz of ``members`` empty files, written as raw headers (tarfile would take minutes). With
    ``damaged_after``, the compressed stream is garbage after that many members."""
    info = tarfile.TarInfo("x")
    block = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    with open(path, "wb") as raw:
        compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip framing
        for i in range(members):
            if i == damaged_after:
                raw.write(compressor.flush(zlib.Z_SYNC_FLUSH) + b"\xff" * 4096)
                return
            name = f"{i:07d}.txt".encode()
            header = bytearray(block)
            header[0:100] = name.ljust(100, b"\0")
            header[148:156] = b"        "
            header[148:156] = f"{sum(header):06o}\0 ".encode()
            raw.write(compressor.compress(bytes(header)))
        raw.write(compressor.compress(b"\0" * 1024))
        raw.write(compressor.flush())


def test_a_tar_is_refused_for_its_count_before_the_headers_past_the_limit_are_read(tmp_path: Path) -> None:
    """Structural, not a stopwatch: the stream is damaged a few hundred headers past the limit (tarfile
    reads ahead by ~10), so only a count checked as each header is read answers "more than N files";
    an archive read further is "damaged"."""
    archive = tmp_path / "damaged.tar.gz"
    million_member_tar_gz(archive, damaged_after=1400)
    with pytest.raises(tarfile.ReadError), tarfile.open(archive, "r:gz") as whole:
        whole.getmembers()
    with pytest.raises(UploadError, match="more than 1000 files"):
        extract_dataset(archive, tmp_path / "datasets" / "d", ArchiveLimits(1000, 1024**3))
    # Within a limit the damage is reached: named as such, not as "not an archive".
    with pytest.raises(UploadError, match="the archive is damaged"):
        extract_dataset(archive, tmp_path / "datasets" / "d", ArchiveLimits(2000, 1024**3))
    assert not (tmp_path / "datasets" / "d").exists()


def test_a_tar_gz_of_a_million_empty_members_is_refused_fast_in_bounded_memory(tmp_path: Path) -> None:
    archive = tmp_path / "million.tar.gz"
    million_member_tar_gz(archive)
    limits = ArchiveLimits(max_files=20_000, max_total_bytes=1024**3)
    started = time.perf_counter()
    with pytest.raises(UploadError, match="more than 20000 files"):
        extract_dataset(archive, tmp_path / "datasets" / "million", limits)
    took = time.perf_counter() - started
    tracemalloc.start()  # a second run for the memory (tracing slows Python down)
    with pytest.raises(UploadError, match="more than 20000 files"):
        extract_dataset(archive, tmp_path / "datasets" / "million", limits)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"1,000,000-member tar.gz ({archive.stat().st_size / 1e6:.1f} MB): refused in {took:.2f} s, "
          f"peak Python memory {peak / 1e6:.1f} MB")
    assert took < 5 and peak < 50 * 1024 * 1024
    assert not (tmp_path / "datasets" / "million").exists()
    assert [p.name for p in (tmp_path / "datasets").iterdir()] == []


def test_a_zip_whose_directory_holds_too_many_entries_is_refused_before_zipfile_reads_it(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for i in range(30_010):
            archive.writestr(f"{i}.txt", b"")
    data = bytearray(buffer.getvalue())
    # The last directory record is damaged: zipfile, reading the whole directory, would stop there
    # ("Bad magic number"). Refused for its count, the archive's directory is never read that far.
    last = data.rindex(b"PK\x01\x02")
    data[last + 3] = 0x09
    path = tmp_path / "many.zip"
    path.write_bytes(bytes(data))
    with pytest.raises(zipfile.BadZipFile, match="magic number"):
        zipfile.ZipFile(path)
    tracemalloc.start()
    with pytest.raises(UploadError, match="more than 30000 files"):
        extract_dataset(path, tmp_path / "datasets" / "many", ArchiveLimits(30_000, 1024**3))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # zipfile holds a ZipInfo per entry (~10 MB for these 30,010); the count reads a few KB.
    assert peak < 2 * 1024 * 1024, peak
    assert not (tmp_path / "datasets" / "many").exists()


# 12000x12000 (144 MP) and 10000x10001 are over our 100 MP limit but under Pillow's own (178.9 MP):
# only our check stands between them and a decode.
@pytest.mark.parametrize(
    "declared", [(100_000, 100_000), (20_000, 20_000), (1, 200_000_000), (12_000, 12_000), (10_000, 10_001)]
)
def test_an_image_declaring_an_absurd_size_is_refused_before_decoding(tmp_path: Path, declared: tuple[int, int]) -> None:
    bomb = png_declaring(*declared)
    assert len(bomb) < 200
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("photos/bomb.png", bomb)
        z.writestr("photos/bomb.txt", "a bomb")
    tracemalloc.start()
    with pytest.raises(UploadError, match=r"'photos/bomb.png': declares .*refused before decoding"):
        extract_dataset(archive, tmp_path / "datasets" / "bomb", ArchiveLimits(10, 1024**3))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 10 * 1024 * 1024


def test_an_image_declaring_exactly_the_limit_is_accepted_from_its_header(tmp_path: Path) -> None:
    """100 MP is allowed (10000x10001 above is not): the limit is ours, not Pillow's, and the header is
    all that is read."""
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("photos/big.png", png_declaring(10_000, 10_000))
        z.writestr("photos/big.txt", "a big photo")
    tracemalloc.start()
    assert extract_dataset(archive, tmp_path / "datasets" / "big", ArchiveLimits(10, 1024**3)) == 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 10 * 1024 * 1024
    assert sorted(p.name for p in (tmp_path / "datasets" / "big").iterdir()) == ["big.png", "big.txt"]


def test_the_default_training_resolutions_are_the_libraries() -> None:
    from urae.train.config import TrainConfig, load_recipe

    assert DEFAULT_TRAINING_RESOLUTION == TrainConfig(dataset_dir=Path("d"), output_dir=Path("o")).resolution
    recipes = Path(__file__).resolve().parents[2] / "recipes"
    for name, resolution in SHIPPED_RECIPE_RESOLUTIONS.items():
        assert load_recipe(str(recipes / f"{name}.yaml"))["resolution"] == resolution


def dataset_zip(sizes: dict[str, tuple[int, int]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, size in sizes.items():
            archive.writestr(f"pets/{name}.png", png_bytes(*size))
            archive.writestr(f"pets/{name}.txt", f"a photo of {name}")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("recipe", "small", "rule"),
    [({}, (1000, 700), "at least 1024 px"), ({"resolution": 512}, (200, 255), "at least 256 px"),
     ({"recipe": "urae-4k"}, (2000, 1500), "at least 2048 px")],
)
def test_a_dataset_image_too_small_to_train_on_is_a_422_naming_it(
    http: Any, service_env: dict[str, str], recipe: dict[str, Any], small: tuple[int, int], rule: str
) -> None:
    big = (4096, 8)
    response = http.post(
        "/finetune",
        files={"dataset": ("pets.zip", dataset_zip({"big": big, "tiny-cat": small}), "application/zip")},
        data={"adapter_name": "pets", "recipe": json.dumps(recipe)},
    )
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert response.json()["field"] == "dataset"
    assert "'pets/tiny-cat.png'" in detail and f"{small[0]}x{small[1]}" in detail and rule in detail
    assert service_env["URAE_STORAGE_DIR"] not in detail and "/tmp" not in detail
    # Big enough: accepted (202), the same archive minus the small image.
    ok = http.post(
        "/finetune",
        files={"dataset": ("pets.zip", dataset_zip({"big": big}), "application/zip")},
        data={"adapter_name": f"pets-ok-{small[0]}", "recipe": json.dumps(recipe)},
    )
    assert ok.status_code == 202, ok.text
    http.delete(f"/jobs/{ok.json()['id']}")

