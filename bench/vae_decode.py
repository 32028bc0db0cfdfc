"""VAE decode at 4096 px: exact in bounded memory, tiled and patch-wise against a plain decode, tiny
model (CPU).

Each mode runs in its own process so that peak RSS (ru_maxrss) is that mode's alone; the baseline
row is a process that builds the model and the latents but decodes nothing.

    python bench/vae_decode.py            # 4096 px
    python bench/vae_decode.py --size 2048
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def child(mode: str, size: int, out_path: str) -> None:
    import numpy as np
    import torch

    from urae.tiny import build_tiny_pipeline
    from urae.vae_decode import decode_latents

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    vae = build_tiny_pipeline("tiny").vae
    latents = torch.randn(
        1, vae.config.latent_channels, size // 8, size // 8, generator=torch.Generator().manual_seed(0)
    )
    seconds = 0.0
    if mode != "baseline":
        start = time.perf_counter()
        image = decode_latents(vae, latents, mode)
        seconds = time.perf_counter() - start
        np.save(out_path, image[0].numpy())  # float32: the exact modes differ by ~1e-6
        del image
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_rss_mib": peak_mib}))


def run(mode: str, size: int, out_path: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--size", str(size), "--out", out_path],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--child")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.size, args.out)
        return

    import numpy as np

    modes = ("baseline", "full", "exact", "tiled", "patched")
    with tempfile.TemporaryDirectory() as tmp:
        rows = {mode: run(mode, args.size, os.path.join(tmp, f"{mode}.npy")) for mode in modes}
        images = {mode: np.load(os.path.join(tmp, f"{mode}.npy")) for mode in modes[1:]}
    full = images["full"]
    base = rows["baseline"]["peak_rss_mib"]
    print(f"VAE decode {args.size}x{args.size}, tiny model, CPU ({os.cpu_count()} cores)")
    print(f"{'mode':<10}{'seconds':>10}{'peak RSS MiB':>15}{'above baseline':>16}{'max|diff|':>12}{'mean|diff|':>12}")
    for mode, row in rows.items():
        diff = np.abs(images[mode] - full) if mode in images else None
        max_diff = f"{diff.max():>12.2e}" if diff is not None else f"{'':>12}"
        mean_diff = f"{diff.mean():>12.2e}" if diff is not None else f"{'':>12}"
        print(
            f"{mode:<10}{row['seconds']:>10.2f}{row['peak_rss_mib']:>15.0f}"
            f"{row['peak_rss_mib'] - base:>16.0f}{max_diff}{mean_diff}"
        )
    for mode in ("exact", "tiled", "patched"):
        ratio = rows[mode]["peak_rss_mib"] / rows["full"]["peak_rss_mib"]
        ratio_above = (rows[mode]["peak_rss_mib"] - base) / (rows["full"]["peak_rss_mib"] - base)
        seconds = rows[mode]["seconds"] / rows["full"]["seconds"]
        diff = np.abs(images[mode] - full)
        print(
            f"{mode}/full peak RSS: {ratio:.1%} (of the memory the decode adds: {ratio_above:.1%}), time {seconds:.2f}x;"
            f" |{mode} - full| max {diff.max():.2e}  mean {diff.mean():.2e}"
        )


if __name__ == "__main__":
    main()
