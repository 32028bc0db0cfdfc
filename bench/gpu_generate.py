"""End-to-end generation on the REAL FLUX.1-dev architecture with random weights: one row per (tier, size).

The whole pipeline is resident, as a worker holds it: transformer, VAE, CLIP-L, T5-XXL (offloaded
between encodes unless --text-encoder-offload none) and real-size URAE adapters (rank 16 at 2K, the
rank-48 converted 4K adapter), served through ``urae.generate.Generator`` with each preset's
settings. Per row: a 1-step warm-up at that size (compiles), then a timed run on a fresh prompt:
text encode, denoise (per-step time from synchronised step stamps), decode, uint8 on the device,
PNG encode; the 28-step estimate; the device's peak memory; the attention kernel that ran (profiler,
first size of each tier); dynamo compilations during the timed run (0 = no recompilation); PSNR of
the image against the quality tier's on the same seed and prompt. Then the adapter hot-swap time
and whether swapping recompiles.

    python bench/gpu_generate.py                          # cuda:0, 2048 and 4096 px, 4 timed steps
    python bench/gpu_generate.py --device cuda:1 --sizes 1024 2048 --tiers quality turbo --steps 8
    python bench/gpu_generate.py --tiny --out /tmp/bench  # CPU, tiny model, seconds

A time budget (--budget-s) skips the rows that would not fit and says which.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_arch import (  # noqa: E402
    FLUX_DEV_TRANSFORMER,
    build_real_pipeline,
    build_real_transformer,
    flops_per_step,
    real_lora_state_dict,
)

from urae.generate import Generator  # noqa: E402
from urae.memory import PEAK_GPU_KEY, PEAK_RSS_KEY  # noqa: E402
from urae.output import save_image  # noqa: E402
from urae.presets import resolve_spec  # noqa: E402
from urae.spec import AdapterRef, GenerationSpec  # noqa: E402

REAL_PRESETS = {1024: "1k", 2048: "2k", 4096: "4k"}
BF16_TIERS = ("quality", "turbo")  # one bf16 load serves these; fast needs its own (fp8) load
ATTENTION_RE = re.compile(r"flash|fmha|attention|sdpa|cudnn|scaled_dot", re.IGNORECASE)


class Budget:
    """Wall-clock budget of the whole run; rows that would overrun it are skipped."""

    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dynamo_compiles() -> int:
    """Frames dynamo has compiled so far (first compiles and recompiles)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["frames"]["total"])


def psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def preset_for(size: int, sizes: list[int], tiny: bool) -> str:
    """The preset whose settings a row runs: by size on the real model; on the tiny model the
    largest size plays 4K and the others 2K (URAE settings at sizes a CPU runs in seconds)."""
    if tiny:
        return "4k" if size == max(sizes) and len(sizes) > 1 else "2k"
    return REAL_PRESETS.get(size, "2k" if size < 3072 else "4k")


def spec_for(prompt: str, tier: str, size: int, preset: str, steps: int, adapters: tuple[AdapterRef, ...] = ()) -> GenerationSpec:
    extra: dict[str, Any] = {"tier": tier} if "tier" in {f.name for f in fields(GenerationSpec)} else {}
    return resolve_spec(prompt, preset, width=size, height=size, steps=steps, seed=0, adapters=adapters, **extra)


def build_pipeline(tiny: bool, device: torch.device) -> Any:
    if tiny:
        from urae.tiny import build_tiny_pipeline

        return build_tiny_pipeline("tiny", dtype=torch.float32).to(device)
    return build_real_pipeline(device)


def fresh_transformer(tiny: bool, device: torch.device) -> torch.nn.Module:
    """The same random transformer again (same seed): the fp8 load starts from the bf16 weights."""
    if tiny:
        from urae.tiny import build_tiny_pipeline

        return build_tiny_pipeline("tiny", dtype=torch.float32).transformer.to(device)
    return build_real_transformer(device)


def write_adapters(config: dict[str, Any], folder: Path, tiny: bool) -> dict[str, Path]:
    """Random adapters of the published sizes: urae-2k rank 16, urae-4k (converted) rank 48, and two
    rank-48 user adapters to swap between. The tiny model gets ranks 4 and 8."""
    from safetensors.torch import save_file

    small, large = (4, 8) if tiny else (16, 48)
    ranks = {"urae-2k": small, "urae-4k": large, "swap-a": large, "swap-b": large}
    paths = {}
    for seed, (name, rank) in enumerate(ranks.items()):
        path = folder / f"{name}.safetensors"
        save_file(real_lora_state_dict(rank, seed, config), str(path))
        paths[name] = path
    return paths


def make_generator(pipe: Any, model_id: str, paths: dict[str, Path], tiers: tuple[str, ...], args: argparse.Namespace) -> Generator:
    options: dict[str, Any] = {
        "adapter_resolver": lambda name: paths[name],
        "hotswap_rank": 8 if args.tiny else 48,
        "text_encoder_offload": args.text_encoder_offload,
        "tiers": tiers,
        "compile": args.compile,
    }
    accepted = inspect.signature(Generator.__init__).parameters
    return Generator(pipe, model_id, **{k: v for k, v in options.items() if k in accepted})


def attention_kernel(generator: Generator, spec: GenerationSpec, device: torch.device) -> str:
    """The attention kernel that took the most time in a 1-step run (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        generator.generate(replace(spec, steps=1))
        sync(device)
    best, best_time = "", 0.0
    for event in prof.key_averages():
        if not ATTENTION_RE.search(event.key):
            continue
        if device.type == "cuda":
            spent = float(getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0) or 0)
        else:
            spent = float(event.self_cpu_time_total)
        if spent > best_time:
            best, best_time = event.key, spent
    name = best.removeprefix("void ").split("(")[0]
    return (name[:48] + "...") if len(name) > 51 else (name or "none seen")


def run_row(
    generator: Generator, tier: str, size: int, preset: str, args: argparse.Namespace, device: torch.device,
    config: dict[str, Any], probe_kernel: bool, scratch: Path,
) -> tuple[dict[str, Any], Image.Image]:
    warm = spec_for(f"warm-up {tier} {size}", tier, size, preset, 1)
    started = time.perf_counter()
    generator.generate(warm)
    sync(device)
    warm_s = time.perf_counter() - started

    compiles_before = dynamo_compiles()
    # The same prompt and seed for every tier of a size (PSNR against quality compares like with like);
    # the prompt cache is emptied so that every timed run encodes its prompt.
    spec = spec_for(f"a mountain lake at dawn, {size} px", tier, size, preset, args.steps)
    generator.prompts.clear()
    stamps: list[float] = []

    def on_progress(p: Any) -> None:
        if p.stage == "denoise" and p.step > 0:
            sync(device)
            stamps.append(time.perf_counter())

    sync(device)
    started = time.perf_counter()
    result = generator.generate(spec, on_progress=on_progress)
    sync(device)
    generate_s = time.perf_counter() - started
    started = time.perf_counter()
    save_image(result.images[0], result.metadata[0], scratch / f"{tier}_{size}.png")
    encode_s = time.perf_counter() - started
    compiles = dynamo_compiles() - compiles_before

    t = result.timings
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    # Mean over steps 2..n (the first carries one-off work): a step cache makes steps uneven.
    per_step = statistics.fmean(gaps) if gaps else t["denoise"] / args.steps
    flops = flops_per_step(config, size, size, spec.max_sequence_length)
    peak = t.get(PEAK_GPU_KEY, t.get(PEAK_RSS_KEY, float("nan")))
    meta = result.metadata[0]
    kernel = attention_kernel(generator, spec, device) if probe_kernel else "(as above)"
    row = {
        "tier": tier, "size": size, "preset": preset, "steps": args.steps, "warm_up_s": warm_s,
        "per_step_s": per_step, "tflops": flops["total"] / per_step / 1e12,
        "text_encode_s": t["text_encode"], "denoise_s": t["denoise"], "decode_s": t["decode"],
        "encode_s": encode_s, "end_to_end_s": generate_s + encode_s,
        "est_28_steps_s": t["text_encode"] + 28 * per_step + t["decode"] + encode_s,
        "peak_gib": peak / 2**30, "peak_measure": PEAK_GPU_KEY if PEAK_GPU_KEY in t else PEAK_RSS_KEY,
        "attention_backend": meta.get("attention_backend", "?"), "kernel": kernel,
        "compiles_timed_run": compiles, "adapters": [a["name"] for a in meta.get("adapters", [])],
        "precision": meta.get("precision", str(generator.pipe.transformer.dtype).removeprefix("torch.")),
    }
    return row, result.images[0]


def hotswap_row(generator: Generator, size: int, preset: str, tier: str, device: torch.device) -> dict[str, Any]:
    """Median time of swapping the user adapter (activate, synchronised), and compilations caused by
    generating with one user adapter, then the other (1 step each, after warm-up at this size)."""
    manager = generator.adapters
    for name in ("swap-a", "swap-b"):
        target = generator.resolve_adapter(name)
        path, sha = target if isinstance(target, tuple) else (target, None)
        manager.ensure(name, path, sha)
    base = spec_for("hot-swap", tier, size, preset, 1)
    preset_refs = tuple(base.adapters)
    times = []
    for i in range(8):
        refs = [*preset_refs, AdapterRef("swap-a" if i % 2 else "swap-b", 1.0)]
        sync(device)
        started = time.perf_counter()
        manager.activate(refs)
        sync(device)
        times.append(time.perf_counter() - started)
    swap_ms = statistics.median(times[2:]) * 1000
    generator.generate(spec_for("hot-swap", tier, size, preset, 1, (AdapterRef("swap-a"),)))
    before = dynamo_compiles()
    for name in ("swap-b", "swap-a"):
        generator.generate(spec_for("hot-swap", tier, size, preset, 1, (AdapterRef(name),)))
    sync(device)
    return {"swap_ms": swap_ms, "swap_ms_all": [round(x * 1000, 3) for x in times],
            "compiles_after_swaps": dynamo_compiles() - before, "size": size, "tier": tier}


def estimate_row_s(config: dict[str, Any], size: int, steps: int, rate: float, first_of_tier: bool, device: torch.device) -> float:
    per_step = flops_per_step(config, size, size)["total"] / rate
    overhead = 0.0
    if device.type == "cuda":
        overhead = (60.0 if first_of_tier else 20.0) + 3.0 * (size / 2048) ** 2  # compile, decode, PNG
    return (steps + 2 + (1 if first_of_tier else 0)) * per_step * 1.2 + overhead


def table_lines(rows: list[dict[str, Any]], swap: dict[str, Any] | None, skipped: list[str], header: list[str]) -> list[str]:
    lines = list(header)
    lines.append("| tier | size | steps | s/step | TFLOP/s | text s | denoise s | decode s | PNG s | end-to-end s | "
                 "28-step est s | peak GiB | backend / kernel | compiles | PSNR vs quality dB |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tier']} | {r['size']} | | | | | | | | | | | error: {r['error']} | | |")
            continue
        q = r.get("psnr_vs_quality")
        q_text = "-" if q is None else ("inf" if math.isinf(q) else f"{q:.1f}")
        lines.append(
            f"| {r['tier']} | {r['size']} | {r['steps']} | {r['per_step_s']:.3f} | {r['tflops']:.3g} | "
            f"{r['text_encode_s']:.2f} | {r['denoise_s']:.2f} | {r['decode_s']:.2f} | {r['encode_s']:.2f} | "
            f"{r['end_to_end_s']:.2f} | {r['est_28_steps_s']:.1f} | {r['peak_gib']:.2f} | "
            f"{r['attention_backend']} / {r['kernel']} | {r['compiles_timed_run']} | {q_text} |"
        )
    if swap is not None:
        if "error" in swap:
            lines.append(f"\nhot-swap: error: {swap['error']}")
        else:
            lines.append(f"\nhot-swap (user adapter, rank {swap.get('rank', '?')}, activate + sync): "
                         f"median {swap['swap_ms']:.2f} ms; compilations over two swapped generations: "
                         f"{swap['compiles_after_swaps']}")
    for line in skipped:
        lines.append(f"skipped: {line}")
    return lines


def save_samples(images: dict[int, dict[str, Image.Image]], out: Path) -> None:
    """One JPEG per size: the tiers side by side (downscaled) on top, a full-resolution centre crop of
    each below (where detail differences show)."""
    for size, by_tier in images.items():
        tiles = list(by_tier.items())
        thumb, crop = min(768, size), min(512, size)
        sheet = Image.new("RGB", (max(thumb, crop) * len(tiles), thumb + crop), "white")
        for i, (_, image) in enumerate(tiles):
            x = i * max(thumb, crop)
            sheet.paste(image.resize((thumb, thumb), Image.LANCZOS), (x, 0))
            left, top = (image.width - crop) // 2, (image.height - crop) // 2
            sheet.paste(image.crop((left, top, left + crop, top + crop)), (x, thumb))
        sheet.save(out / f"samples_{size}_{'-'.join(name for name, _ in tiles)}.jpg", quality=92)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (seconds)")
    parser.add_argument("--device", default=None, help="cuda:N (default cuda:0) or cpu")
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--tiers", nargs="+", default=None, help="default: every tier the device serves")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 4; tiny 2)")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the whole run")
    parser.add_argument("--out", type=Path, default=None, help="folder for the table, rows.json and sample images")
    parser.add_argument("--text-encoder-offload", default="auto", choices=("auto", "none", "group"))
    parser.add_argument("--compile", default=None, choices=("on", "off"), help="default: on CUDA only")
    parser.add_argument("--no-hotswap", action="store_true")
    args = parser.parse_args(argv)
    args.compile = None if args.compile is None else args.compile == "on"
    args.steps = args.steps or (2 if args.tiny else 4)
    args.sizes = args.sizes or ([256, 512] if args.tiny else [2048, 4096])
    args.budget_s = args.budget_s or (120.0 if args.tiny else 420.0)
    return args


def served_tiers(requested: list[str] | None, device: torch.device) -> list[str]:
    """The requested tiers (a tier the device cannot run then reports why), default every tier it serves."""
    if requested is not None:
        return list(requested)
    try:
        from urae.tiers import supported_tiers
    except ImportError:
        return ["quality"]
    return list(supported_tiers(device))


def _stop_on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    # A hard time limit (timeout(1) sends TERM) ends the current row; the table of the finished rows is
    # still written. INT too, even when started in the background with INT ignored.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_on_signal)
        signal.signal(signal.SIGINT, _stop_on_signal)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda:0"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny on a CPU")
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    out = args.out
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="urae-bench-"))
    tiers = served_tiers(args.tiers, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"

    started = time.perf_counter()
    pipe = build_pipeline(args.tiny, device)
    sync(device)
    build_s = time.perf_counter() - started
    config = dict(pipe.transformer.config)
    model_id = "tiny" if args.tiny else "flux-dev-architecture-random"
    paths = write_adapters(config, scratch, args.tiny)
    bf16_tiers = tuple(t for t in tiers if t in BF16_TIERS) or ("quality",)
    started = time.perf_counter()
    generator = make_generator(pipe, model_id, paths, bf16_tiers, args)
    setup_s = time.perf_counter() - started
    resident = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    params = sum(p.numel() for p in pipe.transformer.parameters())
    t5_gib = sum(p.numel() * p.element_size() for p in pipe.text_encoder_2.parameters()) / 2**30
    header = [
        f"device: {name} ({device}); torch {torch.__version__}; model: {model_id}, transformer {params / 1e9:.2f} B "
        f"parameters; built in {build_s:.1f} s, generator set up in {setup_s:.1f} s; resident after load "
        f"{resident:.2f} GiB (T5 offload: {generator.prompts.offload}; T5 weights {t5_gib:.2f} GiB)",
        f"capabilities: {json.dumps(generator.capabilities(), default=str) if hasattr(generator, 'capabilities') else 'n/a'}",
        f"steps timed per row: {args.steps}; 28-step estimate = text + 28 x s/step + decode + PNG; peak = "
        f"{'CUDA max_memory_allocated' if device.type == 'cuda' else 'peak RSS rise (CPU)'}",
        "",
    ]
    print("\n".join(header), flush=True)

    sizes = sorted(args.sizes)
    plan: list[tuple[str, int]] = [("quality", s) for s in sizes if "quality" in tiers]
    plan += [("hotswap", sizes[0])] if not args.no_hotswap else []
    plan += [("turbo", s) for s in reversed(sizes) if "turbo" in tiers]
    plan += [("fast", s) for s in sizes if "fast" in tiers]
    rows: list[dict[str, Any]] = []
    swap: dict[str, Any] | None = None
    skipped: list[str] = []
    images: dict[int, dict[str, Image.Image]] = {}
    probed: set[str] = set()
    rate = 3e14 if device.type == "cuda" else 2e9  # FLOP/s guess until a row is measured

    current = ""
    try:
        for tier, size in plan:
            current = f"{tier} {size} px"
            preset = preset_for(size, sizes, args.tiny)
            if tier == "fast" and "fast" not in getattr(getattr(generator, "speed", None), "tiers", ()):
                # One load holds bf16 or fp8 weights: the fast rows run on a second load (same weights, fp8).
                from torch import _dynamo

                del generator
                _dynamo.reset()
                gc.collect()
                try:
                    old = pipe
                    pipe = type(old)(**{**old.components, "transformer": fresh_transformer(args.tiny, device)})
                    del old
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    generator = make_generator(pipe, model_id, paths, ("fast",), args)
                except Exception as exc:  # noqa: BLE001 - a row reports its failure and the run goes on
                    skipped.append(f"fast rows: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                    break
            estimate = estimate_row_s(config, size, args.steps, rate, tier not in probed, device)
            if tier == "hotswap":
                estimate = estimate_row_s(config, size, 3, rate, False, device)
            # The first row always runs (the script's hard limit still applies): an estimate must not
            # refuse the one row a run was started for.
            if (rows or swap is not None) and estimate > budget.left():
                skipped.append(f"{tier} {size} px (needs ~{estimate:.0f} s, {budget.left():.0f} s left)")
                print(f"skip {tier} {size}: budget", flush=True)
                continue
            try:
                if tier == "hotswap":
                    swap = hotswap_row(generator, size, preset, "quality" if "quality" in tiers else tiers[0], device)
                    swap["rank"] = 8 if args.tiny else 48
                    print(f"hot-swap: {swap['swap_ms']:.2f} ms, compiles {swap['compiles_after_swaps']}", flush=True)
                else:
                    row, image = run_row(generator, tier, size, preset, args, device, config, tier not in probed, scratch)
                    probed.add(tier)
                    rate = flops_per_step(config, size, size)["total"] / row["per_step_s"]
                    reference = images.get(size, {}).get("quality")
                    row["psnr_vs_quality"] = psnr(image, reference) if reference is not None and tier != "quality" else None
                    images.setdefault(size, {})[tier] = image
                    rows.append(row)
                    print(table_lines([row], None, [], [])[-1], flush=True)
            except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
                message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                if tier == "hotswap":
                    swap = {"error": message}
                else:
                    rows.append({"tier": tier, "size": size, "error": message})
                print(f"{tier} {size}: {message}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if out is not None:
                (out / "rows.json").write_text(json.dumps({"rows": rows, "hotswap": swap, "skipped": skipped}, indent=1, default=str))
    except KeyboardInterrupt:  # the script's hard time limit: keep what ran, write the table
        skipped.append(f"interrupted by the time limit during {current}; later rows did not run")
        print(f"interrupted during {current}", flush=True)
    if out is not None:
        (out / "rows.json").write_text(json.dumps({"rows": rows, "hotswap": swap, "skipped": skipped}, indent=1, default=str))

    flop_lines = ["", "FLOPs per step (real FLUX.1-dev architecture, 512 text tokens):"]
    for size in (1024, 2048, 4096):
        f = flops_per_step(FLUX_DEV_TRANSFORMER, size, size)
        flop_lines.append(f"  {size} px: N={int(f['tokens'])}, total {f['total'] / 1e12:.1f} TFLOP, linear "
                          f"{f['linear'] / 1e12:.1f}, attention {f['attention'] / 1e12:.1f} ({f['attention'] / f['total']:.0%})")
    lines = table_lines(rows, swap, skipped, header) + flop_lines + [f"total wall time {args.budget_s - budget.left():.1f} s"]
    if out is not None:
        (out / "table.md").write_text("\n".join(lines) + "\n")
        save_samples(images, out)
    print("\n".join(lines[len(header):]), flush=True)
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
