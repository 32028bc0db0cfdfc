"""What refining a draft saves: a 1K draft refined at 4K against a 4K generation from noise, on a CPU.

    python bench/refine.py                       # mini, 8 captions, strengths 0.3 0.45 0.6 0.8 (about 2 min on 2 cores)
    python bench/refine.py --images 1 --steps 4 --strengths 0.3 1   # a test runs this

For each caption (the world's held-out captions, seed i for caption i): a draft at the model's 1K preset,
the same prompt and seed at the 4K preset from noise, and the draft refined at 4K at each strength (image
to image over the draft, the schedule's last ``strength`` share run). Every run is timed after a warm-up
at each size; times are compared within this one run. Printed, one row per way of making the 4K image:

- s/image: wall time of the 4K image, the draft's included for refines (and for the draft upscaled with
  Lanczos, the baseline that adds no detail);
- time vs noise: that time over the from-noise time (below 1: refining is cheaper);
- kept: the pixel correlation of the 4K image, scaled down to the draft's size, with the draft (how much
  of the draft's composition survives; from noise: what the same seed at another size shares by chance);
- the judge's scores against the caption (meaningful with the trained ``mini``; ``tiny`` is random).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def correlation(image: Any, draft: Any) -> float:
    """Pearson correlation of ``image`` scaled down to ``draft``'s size with ``draft``, over RGB values."""
    import numpy as np
    from PIL import Image

    small = np.asarray(image.convert("RGB").resize(draft.size, Image.Resampling.BOX), dtype=np.float64).ravel()
    reference = np.asarray(draft.convert("RGB"), dtype=np.float64).ravel()
    if small.std() == 0 or reference.std() == 0:
        return 0.0
    return float(np.corrcoef(small, reference)[0, 1])


def summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    n = len(rows)
    out = {"n": float(n)}
    for name in ("seconds", "kept"):
        out[name] = sum(r[name] for r in rows) / n
    for name in ("correct", "colours_correct", "background_correct", "duplicated"):
        out[name] = sum(bool(r[name]) for r in rows) / n if rows[0].get(name) is not None else math.nan
    widths = [r["edge_width"] for r in rows if r.get("edge_width") is not None and not math.isnan(r["edge_width"])]
    out["edge_width"] = sum(widths) / len(widths) if widths else math.nan
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mini", help="mini (trained; judged) or tiny (random; times only)")
    parser.add_argument("--images", type=int, default=8, help="captions (one image each per row)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.45, 0.6, 0.8])
    parser.add_argument("--steps", type=int, help="schedule length of every run (default: each preset's)")
    parser.add_argument("--draft-preset", default="1k")
    parser.add_argument("--target-preset", default="4k")
    parser.add_argument("--tier", default="quality")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)

    import torch
    from PIL import Image

    from urae.generate import Generator
    from urae.presets import resolve_spec
    from urae.world.judge import judge
    from urae.world.scene import evaluation_captions

    if args.threads:
        torch.set_num_threads(args.threads)
    generator = Generator.load(args.model, device="cpu", dtype="float32", tiers=[args.tier])
    judged = args.model == "mini"
    captions = evaluation_captions(args.images)

    def spec(caption: str, preset: str, seed: int, **extra: Any) -> Any:
        return resolve_spec(caption, preset, model=args.model, schnell=generator.schnell, seed=seed,
                            steps=args.steps, tier=args.tier, **extra)

    def timed(spec_: Any, image: Any = None) -> tuple[Any, float]:
        started = time.perf_counter()
        result = generator.generate(spec_, image=image)
        return result.images[0], time.perf_counter() - started

    # Warm-up at both sizes (first runs allocate and fill caches).
    warm = timed(spec(captions[0], args.draft_preset, 0))[0]
    timed(spec(captions[0], args.target_preset, 0))
    timed(replace(spec(captions[0], args.target_preset, 0), strength=0.5), warm)

    results: dict[str, list[dict[str, Any]]] = {"from noise": [], "draft, upscaled (Lanczos)": []}
    results.update({f"refine, strength {s:g}": [] for s in args.strengths})
    draft_seconds: list[float] = []

    def record(label: str, image: Any, seconds: float, draft: Any, caption: str) -> None:
        row: dict[str, Any] = {"seconds": seconds, "kept": correlation(image, draft)}
        if judged:
            verdict = judge(image, caption)
            row.update(correct=verdict.correct, colours_correct=verdict.colours_correct,
                       background_correct=verdict.background_correct, duplicated=verdict.duplicated,
                       edge_width=verdict.edge_width)
        results[label].append(row)

    for seed, caption in enumerate(captions):
        draft, t_draft = timed(spec(caption, args.draft_preset, seed))
        draft_seconds.append(t_draft)
        big, t_noise = timed(spec(caption, args.target_preset, seed))
        record("from noise", big, t_noise, draft, caption)
        started = time.perf_counter()
        upscaled = draft.resize(big.size, Image.Resampling.LANCZOS)
        record("draft, upscaled (Lanczos)", upscaled, t_draft + time.perf_counter() - started, draft, caption)
        for strength in args.strengths:
            refined, t_refine = timed(replace(spec(caption, args.target_preset, seed), strength=strength), draft)
            record(f"refine, strength {strength:g}", refined, t_draft + t_refine, draft, caption)
        print(f"[{time.strftime('%H:%M:%S')}] {seed + 1}/{len(captions)}", file=sys.stderr, flush=True)

    draft_size = f"{draft.width}x{draft.height}"
    target = spec(captions[0], args.target_preset, 0)
    noise = summarise(results["from noise"])
    print(f"model {args.model}, tier {args.tier}, {len(captions)} captions; draft {draft_size} "
          f"({sum(draft_seconds) / len(draft_seconds):.2f} s), target {target.width}x{target.height}, "
          f"{target.steps} steps; torch threads {torch.get_num_threads()}")
    print("| 4K image | steps run | s/image | time vs noise | kept (corr. with draft) | correct | colours right "
          "| background right | duplicated | edge width (px) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, rows in results.items():
        s = summarise(rows)
        strength = float(label.rsplit(" ", 1)[1]) if label.startswith("refine") else None
        steps_run = 0 if label.startswith("draft") else replace(target, strength=strength).steps_run()
        judged_cells = " | ".join(
            "n/a" if math.isnan(s[k]) else f"{100 * s[k]:.0f} %"
            for k in ("correct", "colours_correct", "background_correct", "duplicated")
        )
        edge = "n/a" if math.isnan(s["edge_width"]) else f"{s['edge_width']:.2f}"
        print(f"| {label} | {steps_run} | {s['seconds']:.2f} | {s['seconds'] / noise['seconds']:.2f} | "
              f"{s['kept']:.2f} | {judged_cells} | {edge} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
