"""PNG encode time and size per zlib compress level, at 2048 and 4096 px, on two kinds of image.

"detailed": smooth colour fields plus pixel-level noise (a generated photo's texture: the hard case
for zlib); "smooth": gradients and soft shapes (illustrations, skies). Each cell is the median of
``--repeats`` encodes into memory with Pillow (the encoder urae.output uses).

    python bench/png_encode.py                    # levels 0 1 2 3 4 6 9, sizes 2048 4096
    python bench/png_encode.py --sizes 2048 --levels 1 6
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from PIL import Image


def detailed_image(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.random((size // 64 + 1, size // 64 + 1, 3)).astype(np.float32)
    base = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float32)
    noise = rng.normal(0.0, 12.0, (size, size, 3)).astype(np.float32)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def smooth_image(size: int) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    r = 255 * x
    g = 255 * (0.5 + 0.5 * np.sin(6.0 * y + 3.0 * x))
    b = 255 * np.exp(-((x - 0.5) ** 2 + (y - 0.4) ** 2) * 8)
    return Image.fromarray(np.stack([r, g, b], axis=-1).round().astype(np.uint8))


def encode(image: Image.Image, level: int) -> tuple[float, int]:
    buffer = io.BytesIO()
    started = time.perf_counter()
    image.save(buffer, format="PNG", compress_level=level)
    return time.perf_counter() - started, buffer.tell()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2, 3, 4, 6, 9])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'image':>9} {'size':>5} {'level':>5} {'seconds':>8} {'MB':>7} {'MB/s in':>8} {'vs level 6 time':>15} {'vs level 6 size':>15}")
    for kind, make in (("detailed", detailed_image), ("smooth", smooth_image)):
        for size in args.sizes:
            image = make(size)
            raw_mb = size * size * 3 / 1e6
            rows = {}
            for level in args.levels:
                runs = [encode(image, level) for _ in range(args.repeats)]
                rows[level] = (statistics.median(t for t, _ in runs), runs[0][1])
            ref = rows.get(6)
            for level, (seconds, nbytes) in rows.items():
                rel_t = f"{seconds / ref[0]:.2f}x" if ref else "-"
                rel_s = f"{nbytes / ref[1]:.2f}x" if ref else "-"
                print(f"{kind:>9} {size:>5} {level:>5} {seconds:>8.3f} {nbytes / 1e6:>7.2f} {raw_mb / seconds:>8.0f} {rel_t:>15} {rel_s:>15}")


if __name__ == "__main__":
    main()
