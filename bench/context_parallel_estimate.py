"""Estimated speed-up of one FLUX.1-dev image over N GPUs (context parallelism): a model, not a measurement.

Only one GPU is ever available to this project's benchmarks, so the multi-GPU figure is computed from
the counted FLOPs of the real architecture (bench/flux_arch.py) and stated rates:

- compute per step on one GPU: linear FLOPs at the bf16 matmul rate, attention FLOPs at the attention
  kernel's rate (H200 measured: 790 TFLOP/s matmul, 660 TFLOP/s FA3; see URAE.md); both divide by N
  (each rank holds N-th of the tokens; Ulysses gives each rank N-th of the heads over all tokens);
- communication per step, not overlapped with compute (diffusers 0.42.1 issues the collectives
  synchronously): Ulysses all-to-alls q, k, v before and the output after each of the 57 attention
  layers, each rank sending (N-1)/N of its N-th; ring (rotate_method "allgather") all-gathers k and v
  per layer; plus one all-gather of the transformer output per step. Bandwidth: NVLink 4 at 450 GB/s
  per direction, taken at 75% in NCCL all-to-all/all-gather (--bandwidth); 25 us per collective.

Text encoding and the VAE decode run once per image on rank 0 and are not split: the figures are for
the denoising loop (28 steps), which is ~95% of a 4K image on one GPU.

    python bench/context_parallel_estimate.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_arch import FLUX_DEV_TRANSFORMER, flops_per_step  # noqa: E402

HIDDEN = FLUX_DEV_TRANSFORMER["num_attention_heads"] * FLUX_DEV_TRANSFORMER["attention_head_dim"]
LAYERS = FLUX_DEV_TRANSFORMER["num_layers"] + FLUX_DEV_TRANSFORMER["num_single_layers"]
BYTES = 2  # bf16 activations


def step_seconds(size: int, gpus: int, mode: str, matmul: float, attention: float, bandwidth: float,
                 latency: float) -> tuple[float, float]:
    """(compute, communication) seconds of one denoising step on each of ``gpus`` GPUs."""
    flops = flops_per_step(FLUX_DEV_TRANSFORMER, size, size)
    compute = ((flops["linear"] + flops["modulation"] * gpus) / matmul + flops["attention"] / attention) / gpus
    if gpus == 1:
        return compute, 0.0
    tokens = flops["tokens"]
    activation = tokens * HIDDEN * BYTES  # one whole-sequence q, k, v or output tensor
    if mode == "ulysses":
        per_layer = 4 * activation * (gpus - 1) / gpus**2
        collectives = 4 * LAYERS
    else:
        per_layer = 2 * activation * (gpus - 1) / gpus
        collectives = 2 * LAYERS
    image_tokens = (size // 16) ** 2
    gather = image_tokens * 64 * BYTES * (gpus - 1) / gpus
    return compute, (LAYERS * per_layer + gather) / bandwidth + (collectives + 1) * latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--matmul-tflops", type=float, default=790.0)
    parser.add_argument("--attention-tflops", type=float, default=660.0)
    parser.add_argument("--bandwidth", type=float, default=0.75 * 450e9, help="bytes/s per GPU in collectives")
    parser.add_argument("--latency-us", type=float, default=25.0)
    parser.add_argument("--steps", type=int, default=28)
    args = parser.parse_args()
    rates = (args.matmul_tflops * 1e12, args.attention_tflops * 1e12, args.bandwidth, args.latency_us * 1e-6)
    print(f"{'size':>5} {'mode':>8} {'GPUs':>4} {'compute/step':>13} {'comm/step':>10} "
          f"{f'{args.steps} steps':>10} {'speed-up':>8} {'efficiency':>10}")
    for size in (1024, 2048, 4096):
        single = args.steps * sum(step_seconds(size, 1, "ulysses", *rates))
        for mode in ("ulysses", "ring"):
            for gpus in (1, 2, 4, 8):
                if gpus == 1 and mode == "ring":
                    continue
                compute, comm = step_seconds(size, gpus, mode, *rates)
                total = args.steps * (compute + comm)
                print(f"{size:>5} {mode if gpus > 1 else '-':>8} {gpus:>4} {compute:>12.3f}s {comm * 1e3:>8.1f}ms "
                      f"{total:>9.1f}s {single / total:>7.2f}x {single / total / gpus:>9.0%}")


if __name__ == "__main__":
    main()
