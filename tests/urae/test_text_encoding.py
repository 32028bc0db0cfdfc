"""Prompt embeddings: the LRU skips both text encoders on a repeat; T5 offloading keeps the images;
each generation reports its peak memory and when its denoise started."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers.hooks import HookRegistry

from tests.pixels import max_pixel_diff
from urae.generate import Generator
from urae.memory import PEAK_GPU_KEY, PEAK_RSS_KEY
from urae.output import tensor_to_images
from urae.presets import resolve_spec
from urae.text_encoding import resolve_offload


def _spec(prompt: str = "a lighthouse at dusk", **overrides):
    fields = {"width": 128, "height": 128, "steps": 2, **overrides}
    return resolve_spec(prompt, "1k", preset_adapter=False, **fields)


@contextmanager
def _count_calls(*modules: torch.nn.Module) -> Iterator[list[str]]:
    calls: list[str] = []
    handles = [m.register_forward_hook(lambda mod, *_: calls.append(type(mod).__name__)) for m in modules]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def test_repeated_prompt_skips_both_text_encoders():
    gen = Generator.load("tiny", device="cpu", dtype="float32", prompt_cache_size=2)
    pipe = gen.pipe
    with _count_calls(pipe.text_encoder, pipe.text_encoder_2) as calls:
        first = gen.generate(_spec())
        assert sorted(calls) == ["CLIPTextModel", "T5EncoderModel"]
        again = gen.generate(_spec(seed=1))
        assert len(calls) == 2, "a repeated prompt ran a text encoder"
        # max_sequence_length is part of the key: a different one encodes again
        gen.generate(_spec(max_sequence_length=128))
        assert len(calls) == 4
    assert first.timings["prompt_cache_hit"] == 0.0 and again.timings["prompt_cache_hit"] == 1.0
    assert (gen.prompts.hits, gen.prompts.misses) == (1, 2)


def test_cached_embeddings_give_the_same_image():
    gen = Generator.load("tiny", device="cpu", dtype="float32")
    cold = gen.generate(_spec())
    warm = gen.generate(_spec())
    assert warm.timings["prompt_cache_hit"] == 1.0
    # same process, same tensors: equal by construction
    assert np.array_equal(np.asarray(cold.images[0]), np.asarray(warm.images[0]))


def test_prompt_cache_evicts_the_least_recently_used():
    gen = Generator.load("tiny", device="cpu", dtype="float32", prompt_cache_size=2)
    device = gen.device
    for prompt in ("one", "two", "one", "three"):  # "two" is the least recently used when "three" comes
        gen.prompts.encode(prompt, 128, device)
    assert len(gen.prompts) == 2
    with _count_calls(gen.pipe.text_encoder_2) as calls:
        assert gen.prompts.encode("one", 128, device)[2] is True
        assert gen.prompts.encode("two", 128, device)[2] is False
    assert len(calls) == 1


def test_cache_size_zero_always_encodes():
    gen = Generator.load("tiny", device="cpu", dtype="float32", prompt_cache_size=0)
    with _count_calls(gen.pipe.text_encoder_2) as calls:
        gen.prompts.encode("same", 128, gen.device)
        gen.prompts.encode("same", 128, gen.device)
    assert len(calls) == 2 and len(gen.prompts) == 0


def test_group_offloaded_t5_gives_the_same_image():
    plain = Generator.load("tiny", device="cpu", dtype="float32", text_encoder_offload="none")
    offloaded = Generator.load("tiny", device="cpu", dtype="float32", text_encoder_offload="group")
    assert offloaded.prompts.offload == "group"
    t5 = offloaded.pipe.text_encoder_2
    # diffusers' group-offloading hooks sit on T5's layers (not on the transformer or CLIP)
    hooked = [n for n, m in t5.named_modules() if "group_offloading" in getattr(m, "_diffusers_hook", HookRegistry(m)).hooks]
    assert any(".SelfAttention.q" in n for n in hooked) and any("DenseReluDense" in n for n in hooked)
    assert not hasattr(offloaded.pipe.transformer, "_diffusers_hook")
    a = plain.generate(_spec())
    b = offloaded.generate(_spec())
    assert max_pixel_diff(a.images[0], b.images[0]) <= 1
    # at rest T5's weights are on the offload device
    assert {p.device.type for p in t5.parameters()} == {"cpu"}


def test_offload_setting_resolution():
    assert resolve_offload("auto", "cuda:1", None) == "group"
    assert resolve_offload("auto", "cpu", None) == "none"
    assert resolve_offload("group", "cuda", "model") == "none"  # pipeline offload already moves T5
    with pytest.raises(ValueError, match="not one of"):
        resolve_offload("fp8", "cuda", None)


def test_generation_reports_peak_memory_and_denoise_start():
    gen = Generator.load("tiny", device="cpu", dtype="float32")
    before = time.time()
    # The measure is how far the RSS peak rose over the RSS at the start: a garbage collection of earlier
    # tests' objects during a generation would give memory back and hide its rise. Collected first, then
    # none during the two generations.
    gc.collect()
    gc.disable()
    try:
        small = gen.generate(_spec())
        big = gen.generate(_spec(width=512, height=512))
    finally:
        gc.enable()
    for result in (small, big):
        assert PEAK_GPU_KEY not in result.timings
        assert result.timings[PEAK_RSS_KEY] >= 0
        assert before <= result.timings["denoise_started_at"] <= time.time()
    # a 512 px image (decode activations of 16x the pixels) needs more memory than a 128 px one
    assert big.timings[PEAK_RSS_KEY] > small.timings[PEAK_RSS_KEY]


_MEASURE_AN_ALLOCATION = """
import json
import numpy as np
from urae.memory import PeakMemory
peak = PeakMemory("cpu")
peak.start()
block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, touched
print(json.dumps({"grown": peak.stop(), "reset": peak._hwm_reset}))
"""


def test_peak_memory_measures_an_allocation():
    # In a process of its own: the measure is the rise of the process's RSS peak over its RSS at the
    # start, so memory that another thread or a garbage collection of an earlier test's objects gives
    # back during the measurement hides the allocation (it read 0 in a full run once).
    proc = subprocess.run([sys.executable, "-c", _MEASURE_AN_ALLOCATION], capture_output=True, text=True,
                          timeout=120, check=True)
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    assert measured["reset"]  # Linux: the peak is reset for the measurement, not the process's lifetime peak
    assert 60 * 2**20 <= measured["grown"] <= 200 * 2**20, measured


def test_uint8_conversion_matches_diffusers_postprocess():
    gen = Generator.load("tiny", device="cpu", dtype="float32")
    decoded = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1
    ours = tensor_to_images(decoded)
    reference = gen.pipe.image_processor.postprocess(decoded, output_type="pil")
    assert [im.size for im in ours] == [(48, 32), (48, 32)]
    for a, b in zip(ours, reference, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
