"""Context parallelism on the CPU: 2 real processes (gloo), diffusers' Ulysses attention, tiny model."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch

from urae.attention import ProportionalAttnProcessor, proportional_scale, set_proportional_attention
from urae.errors import GenerationCanceled, InvalidSpecError, ModelLoadError
from urae.generate import Generator, Progress
from urae.parallel import (
    GeneratorLoader,
    ParallelGenerator,
    ParallelGroupError,
    check_shardable,
    enable_context_parallel,
)
from urae.spec import GenerationSpec

# 128x96: 48 image tokens + 64 text tokens = 112 joint tokens; each of the 2 ranks holds 56. The
# proportional scale of 112 tokens is not that of 56, so a rank that used its own length would differ.
SPEC = dict(prompt="a lighthouse at dusk", width=128, height=96, steps=3, seed=7, max_sequence_length=64,
            ntk_factor=10.0, proportional_attention=True, shift=3.0)


def test_a_rank_that_cannot_load_fails_the_start_and_leaves_nothing_running() -> None:
    # First in this module: the shared group below holds this process's process group once created.
    import torch.distributed as dist

    def ranks() -> set[int]:  # spawned processes (multiprocessing's resource tracker is not one)
        return {c.pid for c in psutil.Process().children() if "spawn_main" in " ".join(c.cmdline())}

    before = ranks()
    with pytest.raises(ModelLoadError, match="rank 1: ModelLoadError: cannot load model") as info:
        ParallelGenerator.start(GeneratorLoader("/nonexistent/model", {}), world=2, device="cpu")
    assert "rank 0: ModelLoadError" in str(info.value)  # every rank's reason, once
    assert not dist.is_initialized()
    assert ranks() <= before


@pytest.fixture(scope="module")
def group() -> Iterator[ParallelGenerator]:
    loader = GeneratorLoader("tiny", {"dtype": "float32", "tiers": ["quality"]}, torch_threads=1)
    threads = torch.get_num_threads()
    generator = ParallelGenerator.start(loader, world=2, device="cpu", mode="ulysses")
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    yield generator
    generator.close()
    torch.set_num_threads(threads)
    assert all(not p.is_alive() for p in generator._processes)


def transformer_output(generator: Generator, num_tokens: int | None) -> torch.Tensor:
    """One transformer call on fixed inputs (48 image + 64 text tokens) with proportional attention:
    scale from ``num_tokens`` (the generation path), or from each call's length when None."""
    transformer = generator.pipe.transformer
    config = transformer.config
    inputs = torch.Generator().manual_seed(0)
    set_proportional_attention(transformer, True, num_tokens)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 48, config.in_channels, generator=inputs),
            encoder_hidden_states=torch.randn(1, 64, config.joint_attention_dim, generator=inputs),
            pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=inputs),
            timestep=torch.tensor([0.6]),
            img_ids=generator.pipe._prepare_latent_image_ids(1, 6, 8, "cpu", torch.float32),
            txt_ids=torch.zeros(64, 3),
            guidance=torch.tensor([3.5]) if config.guidance_embeds else None,
            return_dict=False,
        )[0]


def pixels(generator: Generator | ParallelGenerator, spec: GenerationSpec, **kwargs: object) -> np.ndarray:
    return np.asarray(generator.generate(spec, **kwargs).images[0]).astype(np.int16)


def test_two_ranks_give_the_single_process_image(group: ParallelGenerator, tiny_generator: Generator) -> None:
    spec = GenerationSpec(**SPEC)
    events: list[Progress] = []
    split = pixels(group, spec, on_progress=events.append)
    whole = pixels(tiny_generator, GenerationSpec(**SPEC))
    # Other kernels (a sharded attention) round differently: 1 level of 255 at most.
    assert np.abs(split - whole).max() <= 1
    # The tiny model's pixels hardly react to the attention scale (on vs off: 3 levels at most), so
    # the global length is checked on the transformer's float output below.
    # Progress from rank 0 only: each denoising step once.
    steps = [e.step for e in events if e.stage == "denoise"]
    assert steps == [0, 1, 2, 3]
    assert group.capabilities()["context_parallel"] == 2


def test_image_to_image_runs_on_every_rank(group: ParallelGenerator, tiny_generator: Generator) -> None:
    from PIL import Image

    # A gradient, not a flat colour: the input decides much of the result.
    source = Image.fromarray(np.linspace(0, 255, 60 * 90 * 3).reshape(60, 90, 3).astype(np.uint8))
    spec = GenerationSpec(**{**SPEC, "steps": 4, "strength": 0.5})  # the last 2 of 4 steps
    split = pixels(group, spec, image=source)
    whole = pixels(tiny_generator, spec, image=source)
    assert np.abs(split - whole).max() <= 1
    assert np.abs(whole - pixels(tiny_generator, GenerationSpec(**{**SPEC, "steps": 4}))).max() > 10


def test_proportional_attention_uses_the_global_length(group: ParallelGenerator, tiny_generator: Generator) -> None:
    whole = transformer_output(tiny_generator, 112)
    local = transformer_output(tiny_generator, 56)  # what a rank holding half the tokens would use
    assert (whole - local).abs().max() > 1e-3  # 100 x the tolerance below
    for num_tokens in (112, None):  # the generation path, and the per-call length mode
        split = group.run_on_all_ranks(transformer_output, num_tokens)
        torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-5)


def test_adapters_are_loaded_on_every_rank(group: ParallelGenerator, tiny_generator: Generator) -> None:
    from urae.presets import resolve_spec

    adapters = resolve_spec("x", "2k", schnell=False).adapters  # the preset's URAE adapter
    assert adapters
    spec = GenerationSpec(**{**SPEC, "steps": 1, "adapters": adapters})
    group.generate(spec)
    tiny_generator.generate(spec)
    whole = transformer_output(tiny_generator, 112)
    # Rank 1 computes its heads over all tokens with its own weights: without the adapter there, rank
    # 0's output would differ.
    torch.testing.assert_close(group.run_on_all_ranks(transformer_output, 112), whole, rtol=1e-4, atol=1e-5)
    tiny_generator.adapters.activate([])
    assert (transformer_output(tiny_generator, 112) - whole).abs().max() > 1e-3


def test_cancel_stops_every_rank_at_the_same_step(group: ParallelGenerator, tiny_generator: Generator) -> None:
    spec = GenerationSpec(**{**SPEC, "steps": 50})
    seen: list[int] = []

    def on_progress(p: Progress) -> None:
        if p.stage == "denoise":
            seen.append(p.step)

    with pytest.raises(GenerationCanceled):
        group.generate(spec, on_progress=on_progress, should_cancel=lambda: len(seen) > 2)
    assert max(seen) == 2  # stopped at the step boundary where it was asked, not at the end
    # Every rank left that job at the same point: the next one runs in step and matches a fresh run.
    again = pixels(group, GenerationSpec(**{**SPEC, "steps": 2}))
    fresh = pixels(tiny_generator, GenerationSpec(**{**SPEC, "steps": 2}))
    assert again.shape == fresh.shape == (96, 128, 3) and group.broken is None
    assert np.abs(again - fresh).max() <= 1  # as in the two-ranks test: other kernels, 1 level at most


def test_refusals_leave_the_group_serving(group: ParallelGenerator) -> None:
    # 112x80 has 7 x 5 = 35 image tokens: no equal halves.
    with pytest.raises(InvalidSpecError) as info:
        group.generate(GenerationSpec(**{**SPEC, "width": 112, "height": 80}))
    assert info.value.field == "width"
    with pytest.raises(InvalidSpecError):
        group.generate(GenerationSpec(**{**SPEC, "tier": "turbo"}))
    assert group.capabilities()["tiers"] == ["quality"]
    assert pixels(group, GenerationSpec(**{**SPEC, "steps": 1})).shape == (96, 128, 3)


def test_generate_runs_one_job_at_a_time(group: ParallelGenerator) -> None:
    # Two callers at once must not interleave their commands on the ranks.
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(pixels(group, GenerationSpec(**{**SPEC, "steps": 1}))))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 2 and np.abs(results[0] - results[1]).max() <= 1


def test_length_mode_uses_the_global_length_on_a_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers.models.transformers.transformer_flux import FluxAttention

    import urae.attention as attention

    scales: list[float] = []
    real = attention.dispatch_attention_fn

    def spy(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: object) -> torch.Tensor:
        scales.append(kwargs["scale"])  # type: ignore[arg-type]
        return real(query, key, value, scale=kwargs["scale"])  # type: ignore[arg-type]

    monkeypatch.setattr(attention, "dispatch_attention_fn", spy)
    processor = ProportionalAttnProcessor(mode="length")
    attn = FluxAttention(query_dim=32, heads=2, dim_head=16, pre_only=True)
    hidden = torch.randn(1, 300, 32)  # one rank's quarter of 1200 tokens
    processor(attn, hidden)
    processor._parallel_config = SimpleNamespace(
        context_parallel_config=SimpleNamespace(ring_degree=1, ulysses_degree=4)
    )
    processor(attn, hidden)
    assert scales == [pytest.approx(proportional_scale(300, 16)), pytest.approx(proportional_scale(1200, 16))]


def test_shard_and_group_checks(tiny_generator: Generator) -> None:
    check_shardable(GenerationSpec(prompt="x", width=4096, height=4096, max_sequence_length=512), 8)
    with pytest.raises(InvalidSpecError) as info:
        check_shardable(GenerationSpec(prompt="x", width=1024, height=1024, max_sequence_length=512), 3)
    assert info.value.field == "max_sequence_length"
    with pytest.raises(ModelLoadError, match="heads"):
        enable_context_parallel(SimpleNamespace(config=SimpleNamespace(num_attention_heads=24)), 5, "ulysses")
    # Ring attention needs the log-sum-exp, which PyTorch SDPA (the CPU's kernel) does not return.
    with pytest.raises(ModelLoadError, match="log-sum-exp"):
        enable_context_parallel(tiny_generator.pipe.transformer, 2, "ring")
    assert tiny_generator.pipe.transformer._parallel_config is None
    with pytest.raises(ModelLoadError, match="at least 2"):
        ParallelGenerator.start(GeneratorLoader("tiny", {}), world=1, device="cpu")


def test_a_follower_that_dies_breaks_the_group_and_says_so(group: ParallelGenerator) -> None:
    # Last in this module: it ends the shared group.
    reasons: list[str] = []
    group.on_failure = reasons.append
    group._processes[0].kill()
    deadline = time.monotonic() + 30
    while not reasons and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reasons and "urae-cp-rank1 exited" in reasons[0]
    with pytest.raises(ParallelGroupError, match="not serving"):
        group.generate(GenerationSpec(**SPEC))
