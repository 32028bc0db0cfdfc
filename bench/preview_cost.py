"""What live previews cost the denoising loop: step time with a preview every step vs none, one run.

Tiny model at 2048 px (CPU). Runs alternate off / on so drift of the machine hits both alike. A
step's time is the gap between consecutive denoising progress reports; the VAE decode is skipped
(the run is stopped after its last step), so only denoising is timed. Also printed: the time the
loop itself spends handing a preview over (the latents copy), and how long one preview takes to
render and JPEG-encode in its thread.

    python bench/preview_cost.py                 # 2048 px, 6 steps, 3 runs each
    python bench/preview_cost.py --size 1024 --runs 2
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from typing import Any


def step_times(generator: Any, spec: Any, every: int, renders: list[float], skip_first: bool = True) -> list[float]:
    from PIL import Image

    from urae.errors import GenerationCanceled

    stamps: list[float] = []

    def on_progress(p: Any) -> None:
        if p.stage == "denoise":
            stamps.append(time.perf_counter())

    def on_preview(frame: Any) -> None:
        t0 = time.perf_counter()
        Image.fromarray(frame.pixels).save(io.BytesIO(), "JPEG", quality=70)
        renders.append(time.perf_counter() - t0)

    try:
        # Stop after the last step: the decode is not what is measured.
        generator.generate(spec, on_progress=on_progress, should_cancel=lambda: len(stamps) > spec.steps,
                           on_preview=on_preview, preview_every=every)
    except GenerationCanceled:
        pass
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return gaps[1:] if skip_first else gaps  # the first step warms caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import numpy as np
    import torch

    from urae.generate import Generator
    from urae.previews import PreviewRenderer, latent_rgb_map_for, latents_to_preview, unpack_latents
    from urae.spec import GenerationSpec

    generator = Generator.load("tiny", dtype="float32")
    spec = GenerationSpec(prompt="a lighthouse at dawn", width=args.size, height=args.size, steps=args.steps, seed=1)
    step_times(generator, spec, 0, [])  # warm-up run

    off: list[float] = []
    on: list[float] = []
    renders: list[float] = []
    pair_ratios: list[float] = []
    for _ in range(args.runs):
        off += step_times(generator, spec, 0, [])
        on += step_times(generator, spec, 1, renders)
        # Paired, in one run: a preview every 2nd step renders while the next step runs, so
        # neighbouring steps are one with a preview in the background and one without.
        gaps = step_times(generator, spec, 2, renders, skip_first=False)
        # gaps[k] is step k + 1; a preview is submitted at the end of every even step k, so step
        # k + 1 (gaps[k], k even) runs alongside its render and step k (gaps[k - 1]) does not.
        pair_ratios += [gaps[k] / gaps[k - 1] for k in range(2, len(gaps), 2)]

    # The loop's own share: submit() (a copy of the packed latents), timed directly.
    tokens = (args.size // 16) ** 2
    packed = torch.randn(1, tokens, 4 * generator.pipe.vae.config.latent_channels)
    renderer = PreviewRenderer(lambda *_: np.zeros((1, 1, 3), np.uint8), lambda frame: None, args.size, args.size)
    submits = []
    for step in range(20):
        t0 = time.perf_counter()
        renderer.submit(step, 20, 0, packed)
        submits.append(time.perf_counter() - t0)
        time.sleep(0.01)
    renderer.close()
    rgb_map = latent_rgb_map_for(generator.pipe.vae)
    projections = []
    for _ in range(10):
        t0 = time.perf_counter()
        latents_to_preview(unpack_latents(packed, args.size, args.size), rgb_map, args.size, args.size)
        projections.append(time.perf_counter() - t0)

    off_ms, on_ms = statistics.median(off) * 1000, statistics.median(on) * 1000
    print(f"tiny model, {args.size}x{args.size}, {args.steps} steps, {args.runs} runs each, torch threads "
          f"{torch.get_num_threads()}")
    # The minimum is the least disturbed by other processes on a shared machine; both are printed.
    for label, values in (("previews off", off), ("preview every step", on)):
        print(f"step time, {label + ':':20s} median {statistics.median(values) * 1000:8.1f} ms, "
              f"min {min(values) * 1000:8.1f} ms (of {len(values)})")
    min_off, min_on = min(off) * 1000, min(on) * 1000
    print(f"difference: median {on_ms - off_ms:+.1f} ms ({(on_ms - off_ms) / off_ms:+.1%}), "
          f"min {min_on - min_off:+.1f} ms ({(min_on - min_off) / min_off:+.1%})")
    if pair_ratios:
        print(f"paired neighbouring steps (with / without a render alongside): median ratio "
              f"{statistics.median(pair_ratios):.3f} over {len(pair_ratios)} pairs")
    print(f"in the loop (latents copy):     {statistics.median(submits) * 1000:8.2f} ms "
          f"({statistics.median(submits) * 1000 / off_ms:.2%} of a step)")
    print(f"in the thread: projection       {statistics.median(projections) * 1000:8.2f} ms, "
          f"JPEG {statistics.median(renders) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
