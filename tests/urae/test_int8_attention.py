"""The 8-bit attention backend: registered with diffusers' dispatcher, applies URAE's scale, switches
per request without a new compiled graph; a backend that would drop the scale is refused.

sageattention's kernels need a CUDA GPU; on the CPU the backend runs ``reference_int8_kernel`` (the
same INT8 Q/K per-block arithmetic in PyTorch), which is what these tests check the plumbing with.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch._dynamo
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
from torch._dynamo.utils import counters

from urae.attention import (
    INT8_ATTENTION,
    INT8_BACKEND,
    attention_scale_problem,
    install_int8_kernel,
    int8_attention_problem,
    reference_int8_kernel,
    register_attention_backend,
    set_proportional_attention,
)
from urae.tiny import build_tiny_pipeline


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def int8_reference() -> Iterator[None]:
    previous = INT8_ATTENTION.kernel
    install_int8_kernel(reference_int8_kernel)
    yield
    INT8_ATTENTION.kernel = previous
    INT8_ATTENTION.select(int8=False, exact_backend="native")


def test_a_backend_that_drops_or_ignores_the_scale_is_refused() -> None:
    def drops(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, _parallel_config=None):
        return _sdpa(query, key, value)

    def ignores(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, _parallel_config=None):
        return _sdpa(query, key, value)

    register_attention_backend("test_drops_scale", drops)
    register_attention_backend("test_ignores_scale", ignores)
    assert AttentionBackendName("test_drops_scale").value == "test_drops_scale"
    # diffusers' dispatcher would silently drop `scale` for the first: refused by its signature.
    assert "takes no scale" in attention_scale_problem("test_drops_scale", "cpu", torch.float32)
    assert "ignores its scale" in attention_scale_problem("test_ignores_scale", "cpu", torch.float32)
    assert attention_scale_problem("native", "cpu", torch.float32) is None


def test_int8_backend_applies_the_scale_and_stays_close_to_exact(int8_reference: None) -> None:
    assert attention_scale_problem(INT8_BACKEND, "cpu", torch.float32) is None
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 300, 3, 128, generator=gen) for _ in range(3))
    scale = 1.147 / 128**0.5  # 4K's proportional scale
    INT8_ATTENTION.select(int8=True, exact_backend="native")
    int8 = dispatch_attention_fn(q, k, v, scale=scale, backend=INT8_BACKEND)
    INT8_ATTENTION.select(int8=False, exact_backend="native")
    exact = dispatch_attention_fn(q, k, v, scale=scale, backend=INT8_BACKEND)
    torch.testing.assert_close(exact, _sdpa(q, k, v, scale), rtol=1e-5, atol=1e-5)
    # 8 bits: about 1 % from exact at the same scale, far from the stock scale's output.
    assert 1e-4 < _relative(int8, exact) < 0.03
    assert _relative(int8, _sdpa(q, k, v)) > 3 * _relative(int8, exact)


def test_switching_kernels_does_not_recompile(int8_reference: None) -> None:
    # A FLUX attention module with the 8-bit backend, compiled: the proportional scale (a tensor) and
    # the kernel switch (read when the op runs) change between calls, never the graph.
    transformer = build_tiny_pipeline("tiny").transformer
    attn = transformer.single_transformer_blocks[0].attn
    set_proportional_attention(transformer, True, num_tokens=600)
    attn.processor._attention_backend = AttentionBackendName(INT8_BACKEND)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(attn.forward, fullgraph=True, dynamic=True, backend="eager")
    outputs = {}
    with torch.no_grad():
        compiled(torch.randn(1, 300, 32))
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for n, int8 in [(300, True), (517, False), (517, True), (300, False)]:
                INT8_ATTENTION.select(int8=int8, exact_backend="native")
                set_proportional_attention(transformer, True, num_tokens=n)
                x = torch.randn(1, n, 32, generator=torch.Generator().manual_seed(n))
                outputs[(n, int8)] = (compiled(x), attn.forward(x))
    torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] == graphs == 1
    for got, expected in outputs.values():
        torch.testing.assert_close(got, expected)
    assert not torch.equal(outputs[(517, True)][0], outputs[(517, False)][0])  # the switch took effect


def test_int8_attention_needs_a_cuda_gpu() -> None:
    problem = int8_attention_problem("cpu", "native")
    assert problem is not None and "CUDA" in problem


def test_a_load_with_8_bit_attention_runs_it_for_fast_only(int8_reference: None) -> None:
    # fp8 needs a GPU, so the CPU cannot load a fast tier; the load here is given one by hand, with the
    # 8-bit backend on its processors as SpeedSetup.apply sets it where the kernel passes its checks.
    import numpy as np

    from urae.generate import Generator
    from urae.presets import resolve_spec

    generator = Generator.load("tiny", device="cpu", dtype="float32")
    speed = generator.speed
    before = generator.generate(resolve_spec("a pier", "2k", width=64, height=64, steps=3, seed=2, preset_adapter=False))
    generator.pipe.transformer.set_attention_backend(INT8_BACKEND)
    speed.tiers, speed.fast_attention = ("quality", "fast", "turbo"), INT8_BACKEND

    def run(tier: str) -> tuple[np.ndarray, dict]:
        spec = resolve_spec("a pier", "2k", width=64, height=64, steps=3, seed=2, tier=tier, preset_adapter=False)
        result = generator.generate(spec)
        return np.asarray(result.images[0]).astype(int), result.metadata[0]

    quality, quality_meta = run("quality")
    fast, fast_meta = run("fast")
    again, _ = run("quality")
    assert quality_meta["attention_backend"] == "native" and fast_meta["attention_backend"] == INT8_BACKEND
    # quality through the 8-bit backend's exact path is the stock kernel's image (same process, same
    # kernel: bitwise); fast differs by the 8-bit rounding, a little.
    assert np.array_equal(quality, np.asarray(before.images[0]).astype(int)) and np.array_equal(again, quality)
    assert 0 < np.abs(fast - quality).max() <= 16
    assert generator.capabilities()["fast_attention"] == INT8_BACKEND
    speed.exact_attention_only(generator.pipe.transformer, "the 8-bit kernel has no context parallelism")
    assert run("fast")[1]["attention_backend"] == "native"
    assert generator.capabilities()["notes"] == ["fast attention: the 8-bit kernel has no context parallelism; exact kernel"]
