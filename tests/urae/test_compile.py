"""Compiled transformer blocks: no recompilation after warm-up, and compiled output equals eager.

Recompilation is decided by dynamo's guards, whatever the code generator: the default test compiles
with the "eager" backend (guards and graphs, no code generation) so it runs in seconds. The inductor
tests (real code generation, ~30 s per graph on 2 cores) are marked slow.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from tests.pixels import max_pixel_diff
from urae.adapters import save_lora
from urae.adapters.builtin import resolve_adapter, tiny_lora_layers
from urae.generate import Generator
from urae.presets import resolve_spec
from urae.spec import AdapterRef, GenerationSpec
from urae.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def user_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("compile-adapters")
    transformer = build_tiny_pipeline("tiny").transformer
    return {
        "style": save_lora(folder / "style.safetensors", tiny_lora_layers(transformer, seed=11, rank=8)),
        "other": save_lora(folder / "other.safetensors", tiny_lora_layers(transformer, seed=12, rank=16)),
    }


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _generator(user_adapters: dict[str, Path], compile: bool | str) -> Generator:
    def resolver(name: str) -> Path:
        return user_adapters[name] if name in user_adapters else resolve_adapter(name, "tiny")

    return Generator.load("tiny", device="cpu", dtype="float32", adapter_resolver=resolver, hotswap_rank=48,
                          compile=compile)


def _spec(preset: str, width: int, height: int, tier: str = "quality", adapters: tuple[AdapterRef, ...] = (),
          preset_adapter: bool = True, steps: int = 2) -> GenerationSpec:
    return resolve_spec("a lighthouse at dawn", preset, width=width, height=height, steps=steps, tier=tier, seed=3,
                        adapters=adapters, preset_adapter=preset_adapter)


def test_no_recompilation_after_warm_up(user_adapters: dict[str, Path], fresh_dynamo: None) -> None:
    generator = _generator(user_adapters, compile="eager")
    assert generator.capabilities()["compiled"] is True
    # What a worker's warm-up runs: each preset (proportional attention off at 1k, on at 2k; no
    # adapter, the URAE adapter) and each tier, at one size each.
    warm = [_spec(p, 128, 128, tier=t) for p in ("1k", "2k") for t in ("quality", "turbo")]
    generator.warm_up(warm)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    requests = [
        _spec("1k", 192, 128),  # another aspect ratio
        _spec("2k", 128, 256, adapters=(AdapterRef("style", 0.7),)),  # preset adapter + a user one
        _spec("2k", 160, 96, adapters=(AdapterRef("other", 1.0),)),  # swap the user slot
        _spec("1k", 128, 128, adapters=(AdapterRef("style", -0.5),)),  # a user adapter alone
        _spec("1k", 96, 160, preset_adapter=False),  # none
        _spec("2k", 256, 128, tier="turbo", adapters=(AdapterRef("style", 1.0),)),
        _spec("2k", 128, 128, adapters=(AdapterRef("other", 0.3), AdapterRef("style", 0.6)), preset_adapter=False),
    ]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for spec in requests:
            result = generator.generate(spec)
            assert result.images[0].size == (spec.width, spec.height)
    assert counters["stats"]["unique_graphs"] == graphs
    assert generator.adapters.copies >= 3  # the swaps really happened


def test_proportional_scale_is_not_specialised_per_length(fresh_dynamo: None) -> None:
    # The processor under dynamo alone: two sequence lengths, proportional on and off, one graph.
    from urae.attention import set_proportional_attention

    transformer = build_tiny_pipeline("tiny").transformer
    attn = transformer.single_transformer_blocks[0].attn
    set_proportional_attention(transformer, True, num_tokens=600)
    compiled = torch.compile(attn.forward, fullgraph=True, dynamic=True, backend="eager")
    outputs = {}
    with torch.no_grad():
        compiled(torch.randn(1, 300, 32))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for n, enabled in [(300, True), (517, True), (517, False), (4608, True)]:
                set_proportional_attention(transformer, enabled, num_tokens=n)
                x = torch.randn(1, n, 32, generator=torch.Generator().manual_seed(n))
                outputs[(n, enabled)] = (compiled(x), attn.forward(x))
    for got, expected in outputs.values():
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.slow
def test_inductor_output_equals_eager_and_does_not_recompile(
    user_adapters: dict[str, Path], fresh_dynamo: None
) -> None:
    # Tolerance: inductor fuses and reorders float32 arithmetic; over 2 steps the latents differ by
    # ~1e-6, so pixels differ by at most 1 of 255.
    eager = _generator(user_adapters, compile=False)
    compiled = _generator(user_adapters, compile=True)
    compiled.warm_up([_spec("2k", 128, 128)])
    spec = _spec("2k", 192, 128, adapters=(AdapterRef("style", 0.8),))
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = np.asarray(compiled.generate(spec).images[0])
    expected = np.asarray(eager.generate(spec).images[0])
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def _linear_ops(generator: Generator, spec: GenerationSpec) -> int:
    """Matrix products one generation runs (every LoRA slot layer runs 2 per slot when computed)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    products = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
    count = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            count[0] += func in products
            return func(*args, **(kwargs or {}))

    with Count():
        generator.generate(spec)
    return count[0]


def test_idle_adapter_slots_are_skipped_for_requests_without_adapters(user_adapters: dict[str, Path]) -> None:
    spec = _spec("1k", 64, 64, steps=1)  # no adapter
    counts = {}
    for mode in ("compute", "skip"):
        generator = Generator.load("tiny", device="cpu", dtype="float32", compile=False, idle_adapter_slots=mode)
        layers = len(generator.adapters.target_layers())
        counts[mode] = _linear_ops(generator, spec)
    # 2 slots x (A, B) on every slot layer, once per step: what skipping saves.
    assert counts["compute"] - counts["skip"] == 2 * 2 * layers
    with_adapter = _spec("2k", 64, 64, adapters=(AdapterRef("style", 1.0),), steps=1)
    generator = _generator_with(user_adapters, compile=False, idle_adapter_slots="skip")
    assert _linear_ops(generator, with_adapter) == counts["compute"]  # slots on again with an adapter


def _generator_with(user_adapters: dict[str, Path], **options: object) -> Generator:
    def resolver(name: str) -> Path:
        return user_adapters[name] if name in user_adapters else resolve_adapter(name, "tiny")

    return Generator.load("tiny", device="cpu", dtype="float32", adapter_resolver=resolver, hotswap_rank=48,
                          **options)  # type: ignore[arg-type]


def test_skipping_idle_slots_is_compiled_at_warm_up_not_per_request(
    user_adapters: dict[str, Path], fresh_dynamo: None
) -> None:
    graphs = {}
    for mode in ("compute", "skip"):
        torch._dynamo.reset()
        counters.clear()
        generator = _generator_with(user_adapters, compile="eager", idle_adapter_slots=mode)
        # A worker's warm-up: 1k has no adapter (slots off), 2k brings the URAE adapter (slots on).
        generator.warm_up([_spec(p, 128, 128, tier=t) for p in ("1k", "2k") for t in ("quality", "turbo")])
        graphs[mode] = counters["stats"]["unique_graphs"]
    assert graphs["skip"] > graphs["compute"]  # the slots-off blocks are graphs of their own, built now
    requests = [
        _spec("1k", 192, 128),  # none
        _spec("2k", 128, 256, adapters=(AdapterRef("style", 0.7),)),
        _spec("2k", 96, 160, preset_adapter=False),  # none again, another size
        _spec("1k", 128, 128, adapters=(AdapterRef("other", 1.0),)),
        _spec("2k", 160, 96, tier="turbo", preset_adapter=False),
    ]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for spec in requests:
            assert generator.generate(spec).images[0].size == (spec.width, spec.height)
    assert counters["stats"]["unique_graphs"] == graphs["skip"]


def test_a_failed_compile_falls_back_to_eager_blocks_and_says_so(
    user_adapters: dict[str, Path], fresh_dynamo: None
) -> None:
    generator = _generator(user_adapters, compile="eager")
    transformer = generator.pipe.transformer
    compiled = [m for m in transformer.modules() if hasattr(m.__dict__.get("forward"), "_torchdynamo_orig_callable")]
    assert len(compiled) == generator.speed.compiled_blocks > 0
    expected = np.asarray(_generator(user_adapters, compile=False).generate(_spec("2k", 64, 64)).images[0])
    generator.speed.fall_back_to_eager(transformer, "compile failed (BackendCompilerFailed: ...)")
    graphs = counters["stats"]["unique_graphs"]
    image = np.asarray(generator.generate(_spec("2k", 64, 64)).images[0])
    assert counters["stats"]["unique_graphs"] == graphs  # nothing is compiled any more
    assert not any(hasattr(m.__dict__.get("forward"), "_torchdynamo_orig_callable") for m in transformer.modules())
    assert generator.capabilities()["compiled"] is False
    assert generator.capabilities()["notes"] == ["compile: compile failed (BackendCompilerFailed: ...); the blocks run eagerly"]
    # The same eager blocks as a load that never compiled (another load: within one uint8 step).
    assert max_pixel_diff(image, expected) <= 1
