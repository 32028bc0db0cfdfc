"""Speed tiers: turbo skips work and stays close to quality, fast is refused without fp8, warm-up sets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from urae.cli import main as cli_main
from urae.errors import InvalidSpecError, TierUnavailableError
from urae.generate import Generator
from urae.presets import resolve_spec
from urae.spec import GenerationSpec
from urae.tiers import TURBO_THRESHOLDS, fp8_unavailable_reason, resolve_served_tiers, warmup_specs

# The tiny model's random weights change the first block's residual by 14-36% from step to step
# (a trained FLUX.1 by a few percent), so the presets' thresholds would never skip here. 0.25 makes
# the tiny model skip about a third of its steps, which is what the tests need to see.
TINY_TURBO_THRESHOLD = 0.25


@pytest.fixture(scope="module")
def generator() -> Generator:
    return Generator.load("tiny", device="cpu", dtype="float32")


@pytest.fixture
def block_calls(generator: Generator) -> Iterator[list[int]]:
    """How many times the last block really ran (the step cache skips it on cached steps)."""
    block = generator.pipe.transformer.single_transformer_blocks[-1]
    original = block.forward
    calls = [0]

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    block.forward = counting
    yield calls
    block.forward = original


def _spec(tier: str, seed: int = 5, preset: str = "2k", steps: int = 20) -> GenerationSpec:
    return resolve_spec("a red fox in the snow", preset, width=128, height=128, steps=steps, tier=tier, seed=seed,
                        preset_adapter=False)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of the luminance over 7x7 windows (the usual constants for 8-bit images)."""
    x = torch.tensor(a, dtype=torch.float64).mean(-1)[None, None]
    y = torch.tensor(b, dtype=torch.float64).mean(-1)[None, None]

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, 7, 1)

    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx**2, mean(y * y) - my**2, mean(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


def test_turbo_skips_blocks_and_stays_close_to_quality(generator: Generator, block_calls: list[int]) -> None:
    generator.speed.thresholds["2k"] = TINY_TURBO_THRESHOLD
    try:
        images, calls, metadata = {}, {}, {}
        for tier in ("quality", "turbo"):
            block_calls[0] = 0
            result = generator.generate(_spec(tier))
            images[tier], calls[tier], metadata[tier] = np.asarray(result.images[0]), block_calls[0], result.metadata[0]
        other_seed = np.asarray(generator.generate(_spec("quality", seed=6)).images[0])
    finally:
        generator.speed.thresholds["2k"] = TURBO_THRESHOLDS["2k"]
    assert calls["quality"] == 20
    assert calls["turbo"] <= 0.75 * 20  # at least a quarter of the steps reuse the cached residual
    psnr, ssim = _psnr(images["quality"], images["turbo"]), _ssim(images["quality"], images["turbo"])
    # Same seed: turbo is close to quality; another seed is a different image (the metrics can tell).
    assert psnr >= 40 and ssim >= 0.99, (psnr, ssim)
    assert _psnr(images["quality"], other_seed) < 25 and _ssim(images["quality"], other_seed) < 0.5
    assert metadata["quality"]["tier"] == "quality" and metadata["quality"]["step_cache"] is None
    assert metadata["turbo"]["tier"] == "turbo"
    assert metadata["turbo"]["step_cache"] == {"kind": "first_block", "threshold": TINY_TURBO_THRESHOLD}
    # Back to quality: the cache hooks are gone, every step runs every block again.
    block_calls[0] = 0
    again = generator.generate(_spec("quality"))
    assert block_calls[0] == 20
    # Same process, same weights, same seed, same kernels: bitwise by construction.
    assert np.array_equal(np.asarray(again.images[0]), images["quality"])


def test_quality_reports_its_kernel_and_precision(generator: Generator) -> None:
    assert generator.capabilities() == {
        "tiers": ["quality", "turbo"], "attention_backend": "native", "precision": "float32", "compiled": False,
        "adapter_slots": 2, "memory_profile": "default",
    }
    meta = generator.generate(_spec("quality", steps=2)).metadata[0]
    assert (meta["attention_backend"], meta["precision"], meta["compiled"]) == ("native", "float32", False)
    assert meta["memory_profile"] == "default"
    # The kernel is set on every attention processor, and stays there (proportional attention is
    # switched on the same processors, never by replacing them).
    processors = {type(m.processor).__name__ for m in generator.pipe.transformer.modules() if hasattr(m, "processor")}
    assert processors == {"ProportionalAttnProcessor"}


def test_fast_is_refused_clearly_without_fp8(generator: Generator) -> None:
    reason = fp8_unavailable_reason("cpu")
    assert reason is not None and "compute capability >= 8.9" in reason
    with pytest.raises(TierUnavailableError, match="compute capability >= 8.9") as caught:
        generator.generate(_spec("fast", steps=2))
    assert caught.value.field == "tier"
    with pytest.raises(TierUnavailableError, match="compute capability"):
        resolve_served_tiers(["fast"], "cpu")
    with pytest.raises(InvalidSpecError, match="tier"):
        _spec("slow")


def test_cli_refuses_fast_on_this_device_with_a_message(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.png"
    code = cli_main(["generate", "a fox", "--model", "tiny", "--device", "cpu", "--width", "64", "--height", "64",
                     "--steps", "1", "--tier", "fast", "-o", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "tier:" in err and "fp8" in err and "Traceback" not in err
    assert not out.exists()


def test_warm_up_sets() -> None:
    tiers = ["quality", "turbo"]
    assert warmup_specs("none", False, tiers, 4096 * 4096) == []
    presets = warmup_specs("presets", False, tiers, 2048 * 2048)
    assert [(s.preset, s.width, s.height, s.tier) for s in presets] == [
        ("1k", 1024, 1024, "quality"), ("1k", 1024, 1024, "turbo"),
        ("2k", 2048, 2048, "quality"), ("2k", 2048, 2048, "turbo"),
    ]
    full = warmup_specs("full", True, ["quality"], 4096 * 4096 + 4096 * 64)
    assert len(full) == 3 * 11 and {s.preset for s in full} == {"1k-schnell", "2k-schnell", "4k-schnell"}
    assert {s.adapters[0].name for s in full if s.adapters} == {"urae-2k", "urae-4k-schnell"}
    with pytest.raises(InvalidSpecError, match="warmup"):
        warmup_specs("all", False, tiers, 1)


def test_a_named_attention_backend_is_checked_and_set_on_every_processor() -> None:
    from urae.errors import ModelLoadError
    from urae.models import choose_attention_backend
    from urae.tiny import build_tiny_pipeline

    transformer = build_tiny_pipeline("tiny").transformer
    # FA2 needs the flash-attn package and a GPU: refused by name, nothing changed.
    with pytest.raises(ModelLoadError, match="'flash' does not run on cpu"):
        choose_attention_backend(transformer, preference="flash")
    assert choose_attention_backend(transformer, preference="_native_math") == "_native_math"
    backends = {m.processor._attention_backend for m in transformer.modules() if hasattr(m, "processor")}
    assert backends == {"_native_math"}  # a str enum: equal to its value
    assert choose_attention_backend(transformer) == "native"
