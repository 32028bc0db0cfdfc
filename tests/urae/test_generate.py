from __future__ import annotations

import errno
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.pixels import max_pixel_diff
from urae.errors import GenerationCanceled, InvalidSpecError, OutputWriteError
from urae.generate import Progress, timestep_sigmas
from urae.output import read_metadata, save_image
from urae.presets import resolve_spec
from urae.spec import GenerationSpec


def _spec(**overrides) -> GenerationSpec:
    values = {"width": 128, "height": 96, "steps": 3, "seed": 5}
    values.update(overrides)
    return resolve_spec("a lighthouse on a cliff at dusk", "1k", **values)


def test_generates_requested_size_with_metadata(tiny_generator):
    result = tiny_generator.generate(_spec())
    assert [im.size for im in result.images] == [(128, 96)]
    meta = result.metadata[0]
    assert meta["prompt"] == "a lighthouse on a cliff at dusk"
    assert (meta["seed"], meta["width"], meta["height"], meta["steps"], meta["guidance"]) == (
        5,
        128,
        96,
        3,
        3.5,
    )
    assert meta["model"] == "tiny" and meta["preset"] == "1k" and meta["adapters"] == []
    assert {"torch", "diffusers", "transformers", "peft", "urae-serve"} <= set(meta["versions"])
    # Stage durations, plus when denoising began, the job's peak memory and the prompt cache's answer.
    assert {"text_encode", "denoise", "decode"} <= set(result.timings)
    assert all(result.timings[stage] > 0 for stage in ("text_encode", "denoise", "decode"))
    assert set(result.timings) - {"text_encode", "denoise", "decode"} <= {
        "denoise_started_at", "peak_rss_delta_bytes", "peak_gpu_memory_bytes", "prompt_cache_hit"
    }
    # A random-weight model still gives a non-constant image.
    assert np.asarray(result.images[0]).std() > 1


def test_progress_reports_every_step_in_order(tiny_generator):
    events: list[Progress] = []
    tiny_generator.generate(_spec(steps=4, num_images=2), on_progress=events.append)
    denoise = [e.step for e in events if e.stage == "denoise"]
    assert denoise == sorted(denoise) and denoise[-1] == 8 and set(range(1, 9)) <= set(denoise)
    assert all(e.total == 8 for e in events if e.stage == "denoise")
    assert [e.stage for e in events][0] == "text_encode" and events[-1].stage == "decode"
    assert all(b.elapsed >= a.elapsed for a, b in zip(events, events[1:], strict=False))


def test_cancel_stops_at_the_next_step_and_skips_the_decode(tiny_generator):
    events: list[Progress] = []

    def cancel_after_two() -> bool:
        return any(e.stage == "denoise" and e.step >= 2 for e in events)

    with pytest.raises(GenerationCanceled) as info:
        tiny_generator.generate(_spec(steps=6), on_progress=events.append, should_cancel=cancel_after_two)
    assert info.value.step == 2
    assert max(e.step for e in events if e.stage == "denoise") == 2
    assert not any(e.stage == "decode" for e in events)
    # The pipeline serves the next request normally.
    assert tiny_generator.generate(_spec(steps=2)).images[0].size == (128, 96)


def test_each_image_has_its_own_seed(tiny_generator):
    batch = tiny_generator.generate(_spec(num_images=2, seed=10))
    single = tiny_generator.generate(_spec(seed=11))
    assert [m["seed"] for m in batch.metadata] == [10, 11]
    # A batch of two runs other matmul shapes than a batch of one: equal to within one uint8 step.
    assert max_pixel_diff(batch.images[1], single.images[0]) <= 1
    assert max_pixel_diff(batch.images[0], batch.images[1]) > 1


def test_high_res_settings_change_the_image_and_are_undone(tiny_generator):
    base = np.asarray(tiny_generator.generate(_spec()).images[0])
    spec = _spec(ntk_factor=10.0, proportional_attention=True, shift=3.0)
    high = np.asarray(tiny_generator.generate(spec).images[0])
    assert not np.array_equal(base, high)
    # Same process, same weights, same inputs once the settings are undone: bitwise by construction.
    assert np.array_equal(base, np.asarray(tiny_generator.generate(_spec()).images[0]))


def test_invalid_spec_is_rejected_before_running(tiny_generator):
    spec = _spec()
    spec.steps = 0
    with pytest.raises(InvalidSpecError, match="steps"):
        tiny_generator.generate(spec)


def test_static_shift_denoises_4k_and_dynamic_shift_does_not(tiny_generator):
    config = tiny_generator.pipe.scheduler.config
    tokens = (4096 // 16) ** 2
    static = timestep_sigmas(config, 28, tokens, shift=3.0)
    assert static[0] == pytest.approx(1.0) and static[-1] <= 0.15
    assert all(a > b for a, b in zip(static, static[1:], strict=False))
    dynamic = timestep_sigmas(config, 28, tokens, shift=None)
    assert min(dynamic) > 0.9  # why URAE never uses the dynamic shift above 1K


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_saved_files_carry_the_metadata(tiny_generator, tmp_path, fmt):
    result = tiny_generator.generate(_spec())
    path = save_image(result.images[0], result.metadata[0], tmp_path / f"out.{fmt}", fmt)
    with Image.open(path) as image:
        assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
        assert image.size == (128, 96)
    assert read_metadata(path) == result.metadata[0]
    assert [p.name for p in tmp_path.iterdir()] == [f"out.{fmt}"]


def test_disk_full_leaves_no_partial_file(tmp_path, monkeypatch):
    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OutputWriteError, match="No space left"):
        save_image(Image.new("RGB", (16, 16)), {"seed": 1}, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_cleans_its_temp_file(tmp_path):
    # A file in place of the target's directory entry that cannot be replaced: a directory.
    target = tmp_path / "x.png"
    target.mkdir()
    with pytest.raises(OutputWriteError):
        save_image(Image.new("RGB", (16, 16)), {"seed": 1}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"] and target.is_dir()


_PIXELS_SCRIPT = """
import numpy as np
from urae.generate import Generator
from urae.presets import resolve_spec
g = Generator.load("tiny", device="cpu", dtype="float32")
r = g.generate(resolve_spec("a red fox in snow", "1k", width=96, height=64, steps=2, seed=123))
print(np.asarray(r.images[0]).tobytes().hex())
"""


def test_same_seed_gives_the_same_pixels_in_two_processes(tiny_generator):
    # Each process loads the model anew and may pick other CPU kernels: within one uint8 step.
    images = [
        np.frombuffer(
            bytes.fromhex(
                subprocess.run([sys.executable, "-c", _PIXELS_SCRIPT], capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            ),
            dtype=np.uint8,
        ).reshape(64, 96, 3)
        for _ in range(2)
    ]
    here = tiny_generator.generate(
        resolve_spec("a red fox in snow", "1k", width=96, height=64, steps=2, seed=123)
    )
    assert max_pixel_diff(images[0], images[1]) <= 1
    assert max_pixel_diff(images[0], here.images[0]) <= 1
    # A different seed is a different image, so the comparison above can fail.
    other = tiny_generator.generate(resolve_spec("a red fox in snow", "1k", width=96, height=64, steps=2, seed=124))
    assert max_pixel_diff(images[0], other.images[0]) > 1


@pytest.mark.slow
def test_4k_preset_end_to_end_with_the_urae_4k_adapter(tiny_generator, tmp_path):
    spec = resolve_spec("a mountain lake at sunrise", "4k", steps=2, seed=1)
    events: list[Progress] = []
    result = tiny_generator.generate(spec, on_progress=events.append)
    assert result.images[0].size == (4096, 4096)
    meta = result.metadata[0]
    assert meta["vae_decode"] == "exact" and meta["shift"] == 3.0 and meta["ntk_factor"] == 10.0
    assert [a["name"] for a in meta["adapters"]] == ["urae-4k"] and len(meta["adapters"][0]["sha256"]) == 64
    path = save_image(result.images[0], meta, tmp_path / "lake.png")
    assert read_metadata(path) == meta
