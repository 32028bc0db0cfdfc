"""Dataset checks, aspect buckets and the resumable embedding/latent cache on the tiny model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from urae.data import (
    bucket_sizes,
    cache_dataset,
    encode_posterior,
    fit_to_bucket,
    nearest_bucket,
    scan_dataset,
)
from urae.errors import DatasetError, InvalidSpecError
from urae.tiny import build_tiny_pipeline


def save_image(path: Path, width: int, height: int, seed: int = 0) -> None:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * (seed + 2)) % 256, (y * 3) % 256, ((x + y) * (seed + 1)) % 256], -1)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def pipe():  # type: ignore[no-untyped-def]
    return build_tiny_pipeline("tiny")


def test_json_and_txt_datasets_are_read(tmp_path: Path) -> None:
    (tmp_path / "j").mkdir()
    save_image(tmp_path / "j" / "a.png", 128, 96)
    (tmp_path / "j" / "a.json").write_text(json.dumps({"prompt": "a cat", "generated_prompt": "a grey cat on a sofa"}))
    save_image(tmp_path / "j" / "b.jpg", 96, 96)
    (tmp_path / "j" / "b.json").write_text(json.dumps({"prompt": "a dog"}))
    (tmp_path / "j" / "manifest.json").write_text("{}")  # written by `urae synth`; not a caption
    items = scan_dataset(tmp_path / "j")
    assert [(i.key, i.prompt, i.generated_prompt, i.width, i.height) for i in items] == [
        ("a", "a cat", "a grey cat on a sofa", 128, 96),
        ("b", "a dog", None, 96, 96),
    ]
    (tmp_path / "t").mkdir()
    save_image(tmp_path / "t" / "x.webp", 64, 128)
    (tmp_path / "t" / "x.txt").write_text("  a tall tower \n")
    [item] = scan_dataset(tmp_path / "t")
    assert (item.prompt, item.generated_prompt) == ("a tall tower", None)


def test_every_offending_file_is_reported_at_once(tmp_path: Path) -> None:
    save_image(tmp_path / "ok.png", 128, 128)
    (tmp_path / "ok.json").write_text(json.dumps({"prompt": "fine"}))
    save_image(tmp_path / "nocaption.png", 128, 128)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "broken.json").write_text(json.dumps({"prompt": "x"}))
    save_image(tmp_path / "tiny.png", 40, 30)
    (tmp_path / "tiny.json").write_text(json.dumps({"prompt": "too small"}))
    save_image(tmp_path / "mixed.png", 128, 128)
    (tmp_path / "mixed.txt").write_text("a caption in the other format")
    save_image(tmp_path / "badjson.png", 128, 128)
    (tmp_path / "badjson.json").write_text("{not json")
    (tmp_path / "orphan.json").write_text(json.dumps({"prompt": "no image"}))
    save_image(tmp_path / "dup.png", 128, 128)
    Image.new("RGB", (128, 128)).save(tmp_path / "dup.jpg")
    (tmp_path / "dup.json").write_text(json.dumps({"prompt": "two images, one caption"}))

    with pytest.raises(DatasetError) as err:
        scan_dataset(tmp_path, min_long_side=64)
    problems = dict(err.value.problems)
    assert set(problems) == {"nocaption.png", "broken.png", "tiny.png", "mixed.txt", "badjson.json", "orphan.json", "dup.jpg"}
    assert "no caption" in problems["nocaption.png"]
    assert "unreadable image" in problems["broken.png"]
    assert "40x30" in problems["tiny.png"]
    assert "mixes .json and .txt" in problems["mixed.txt"]
    assert "invalid JSON" in problems["badjson.json"]
    assert "without an image" in problems["orphan.json"]
    assert "shares its name with dup.png" in problems["dup.jpg"]
    message = str(err.value)
    assert "7 problem(s)" in message and "\n" not in message


def test_buckets_keep_the_long_side_and_the_nearest_aspect() -> None:
    sizes = bucket_sizes(2048)
    assert sizes == [(2048, 2048), (2048, 1536), (1536, 2048), (2048, 1024), (1024, 2048), (2048, 512), (512, 2048)]
    assert all(max(s) == 2048 and s[0] % 64 == 0 and s[1] % 64 == 0 for s in sizes)
    assert nearest_bucket(4000, 3000, 4096) == (4096, 3072)
    assert nearest_bucket(1000, 2100, 2048) == (1024, 2048)
    assert nearest_bucket(3000, 700, 2048) == (2048, 512)
    with pytest.raises(InvalidSpecError, match="resolution"):
        bucket_sizes(2000)
    image = Image.new("RGB", (300, 200), "red")
    assert fit_to_bucket(image, (256, 192)).size == (256, 192)


def test_cache_skips_finished_items_and_redoes_changed_ones(tmp_path: Path, pipe) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    data.mkdir()
    for i, size in enumerate([(128, 128), (120, 64), (64, 128)]):
        save_image(data / f"im{i}.png", *size, seed=i)
        (data / f"im{i}.json").write_text(json.dumps({"prompt": f"p{i}", "generated_prompt": f"long caption {i}"}))
    items = scan_dataset(data)
    cache = tmp_path / "cache"
    first = cache_dataset(pipe, items, cache, model_id="tiny", resolution=128, max_sequence_length=64, progress=False)
    assert (first.cached, first.skipped) == (3, 0)
    tensors = load_file(str(cache / "im1.safetensors"))
    assert tensors["latent_mean"].shape == (4, 8, 16)  # the 128x64 (2:1) bucket / VAE scale 8
    assert tensors["latent_std"].shape == (4, 8, 16) and (tensors["latent_std"] > 0).all()
    assert tensors["prompt_embeds"].shape == (64, 32) and tensors["pooled_prompt_embeds"].shape == (32,)
    assert not torch.equal(tensors["prompt_embeds"], tensors["generated_prompt_embeds"])
    assert not list(cache.glob("*.tmp"))

    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    time.sleep(0.01)
    second = cache_dataset(pipe, items, cache, model_id="tiny", resolution=128, max_sequence_length=64, progress=False)
    assert (second.cached, second.skipped) == (0, 3)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes

    # An interrupted write (truncated file) and a changed caption are encoded again; the rest is kept.
    (cache / "im0.safetensors").write_bytes((cache / "im0.safetensors").read_bytes()[:100])
    (data / "im2.json").write_text(json.dumps({"prompt": "p2 changed"}))
    third = cache_dataset(pipe, scan_dataset(data), cache, model_id="tiny", resolution=128, max_sequence_length=64, progress=False)
    assert (third.cached, third.skipped) == (2, 1)
    assert "generated_prompt_embeds" not in load_file(str(cache / "im2.safetensors"))
    # Another resize mode is another cache: each item is encoded again.
    cropped = cache_dataset(pipe, scan_dataset(data), cache, model_id="tiny", resolution=128, max_sequence_length=64,
                            resize_mode="crop", progress=False)
    assert (cropped.cached, cropped.skipped) == (3, 0)


def test_images_are_stretched_to_their_bucket_by_default_and_cropped_on_request() -> None:
    # A 3:2 image goes to the 4:3 bucket. Its outermost columns are marked: a stretch (the reference's
    # resize to the bucket size) keeps the whole image, a crop loses the sides.
    image = Image.new("RGB", (300, 200), (128, 128, 128))
    image.paste((255, 0, 0), (0, 0, 20, 200))
    image.paste((0, 0, 255), (280, 0, 300, 200))
    size = nearest_bucket(300, 200, 256)
    assert size == (256, 192)
    stretched = np.asarray(fit_to_bucket(image, size))
    assert stretched.shape == (192, 256, 3)
    # Independent expectation: every pixel column x of the bucket samples column x * 300 / 256 of the image.
    assert tuple(stretched[96, 2]) == (255, 0, 0) and tuple(stretched[96, 253]) == (0, 0, 255)
    assert tuple(stretched[96, 128]) == (128, 128, 128)
    cropped = np.asarray(fit_to_bucket(image, size, "crop"))
    assert cropped.shape == (192, 256, 3)
    # Covering 256x192 scales by 0.96 to 288x192: 16 columns are cut on each side, the red band (19
    # scaled columns) keeps only ~3.
    assert tuple(cropped[96, 8]) == (128, 128, 128) and tuple(cropped[96, 247]) == (128, 128, 128)
    with pytest.raises(InvalidSpecError, match="resize_mode"):
        fit_to_bucket(image, size, "squash")


def test_tiled_encode_approaches_the_full_encode(pipe) -> None:  # type: ignore[no-untyped-def]
    vae = pipe.vae
    y, x = np.mgrid[0:512, 0:512]
    image = Image.fromarray(np.stack([(x * 2) % 256, (y * 3) % 256, (x + y) % 256], -1).astype(np.uint8))
    full_mean, full_std = encode_posterior(vae, image, tiled=False)
    old = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.tile_sample_min_size, vae.tile_latent_min_size = 256, 32
    try:
        tiled_mean, tiled_std = encode_posterior(vae, image, tiled=True)
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size = old
    assert tiled_mean.shape == full_mean.shape == (4, 64, 64)
    assert not vae.use_tiling  # restored
    # The encoder's global mid-block attention and GroupNorm see one tile at a time, so tiles differ
    # slightly; with half-image tiles the posteriors still agree closely.
    corr = torch.corrcoef(torch.stack([full_mean.flatten(), tiled_mean.flatten()]))[0, 1]
    assert corr > 0.95
    assert (full_mean - tiled_mean).abs().mean() < 0.25 * full_mean.abs().mean()


def test_cache_cli_reports_and_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from urae.cli import main

    data = tmp_path / "data"
    data.mkdir()
    save_image(data / "a.png", 128, 128)
    (data / "a.txt").write_text("a pattern")
    args = ["cache", str(data), "--model", "tiny", "--resolution", "128", "--max-sequence-length", "64", "--device", "cpu"]
    assert main(args) == 0
    assert (data / ".cache" / "128" / "a.safetensors").is_file()
    assert main(args) == 0
    assert "cached 0, already cached 1" in capsys.readouterr().out
    (data / "a.txt").unlink()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "a.png: no caption" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_4k_image_is_cached_through_the_exact_banded_encoder(tmp_path: Path, pipe, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import urae.vae_decode

    data = tmp_path / "data"
    data.mkdir()
    save_image(data / "big.png", 4096, 4096)
    (data / "big.txt").write_text("a very large stripe pattern")
    items = scan_dataset(data, min_long_side=2048)
    exact_calls: list[tuple[int, ...]] = []
    original = urae.vae_decode.exact_encode
    monkeypatch.setattr(urae.vae_decode, "exact_encode",
                        lambda vae, x: exact_calls.append(tuple(x.shape)) or original(vae, x))
    tiled_calls: list[tuple[int, ...]] = []
    vae = pipe.vae
    monkeypatch.setattr(vae, "_tiled_encode", lambda x: tiled_calls.append(tuple(x.shape)))
    report = cache_dataset(pipe, items, tmp_path / "cache", model_id="tiny", resolution=4096, progress=False)
    # Above the 2K budget the cache encodes exactly, band by band; diffusers' (inexact) tiling never runs.
    assert report.cached == 1 and exact_calls == [(1, 3, 4096, 4096)] and tiled_calls == []
    tensors = load_file(str(tmp_path / "cache" / "big.safetensors"))
    assert tensors["latent_mean"].shape == (4, 512, 512) and torch.isfinite(tensors["latent_mean"]).all()
