"""End-to-end generation on the REAL FLUX.1-dev architecture with random weights, in two parts that
each end within a fixed time (a GPU is lent for minutes, not hours).

Part 1 (bf16, the default profile): a matmul measured first (the ceiling each row's TFLOP/s is read
against); quality 2K, quality 4K, the adapter hot-swap, turbo 4K; then attention alone at FLUX's 2K and
4K shapes for every backend that imports, and the adapter slots' share of a step.
Part 2 (8 bits): one load under the ``24gb`` memory profile (fp8 weights, or int8 on Ampere; text
encoders in CPU memory) serving quality, fast (+ 8-bit attention) and turbo, run with the GPU capped at
24 GB (``torch.cuda.set_per_process_memory_fraction``): 4K and 2K per tier, then 4K uncapped. Speeds
are compared with part 1's bf16 rows and images with its quality images (same seeds and prompts), when
part 1 ran on the same machine (``--reference-dir``).

The whole pipeline is resident as a worker holds it (transformer, VAE, CLIP-L, T5-XXL, real-size
adapters) and served through ``urae.generate.Generator``. Per row: a 1-step warm-up at that size
(compiles), a timed run on a fresh prompt (text encode, denoise with synchronised step stamps, decode,
PNG encode), the steps the transformer really computed, peak memory (allocated, reserved and
device-level), the attention kernel the profiler saw, graphs compiled in the warm-up and in the timed
run, PSNR/SSIM against quality. Optional parts that fail (compile, an attention kernel, T5 offloading,
fp8, the 8-bit attention) fall back and the row or header says so.

Every row, and any model load it needs, is started only if the time left (``--deadline``) covers its
estimate; the rest are listed as skipped.

    python bench/gpu_generate.py --part 1                 # cuda:0
    python bench/gpu_generate.py --part 2 --reference-dir outputs/device_reference
    python bench/gpu_generate.py --tiny --part 1 --out /tmp/bench   # CPU, tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_arch import FLUX_DEV_TRANSFORMER, build_real_pipeline, flops_per_step, real_lora_state_dict  # noqa: E402

from urae.generate import Generator  # noqa: E402
from urae.output import save_image  # noqa: E402
from urae.presets import resolve_spec  # noqa: E402
from urae.spec import AdapterRef, GenerationSpec  # noqa: E402

REAL_PRESETS = {1024: "1k", 2048: "2k", 4096: "4k"}
ATTENTION_RE = re.compile(r"flash|fmha|attention|sdpa|cudnn|scaled_dot|attn|sage", re.IGNORECASE)
# diffusers backends timed alone, when their packages import (others: FA2, FA3 need packages the
# device does not have; they are listed as unavailable with the reason).
ATTENTION_BACKENDS = ("_native_cudnn", "_native_flash", "_native_efficient", "native", "_flash_3", "flash", "sage",
                      "urae_int8")
CAP_BYTES = 24 * 10**9  # the 24gb profile's budget (an L4, A10G or RTX 4090)
PROMPT = "a mountain lake at dawn, {size} px"


# -- time ----------------------------------------------------------------------------------------

class Budget:
    """Time left until ``deadline`` (seconds since the epoch: set by the caller's own start, so that
    imports and model building count)."""

    def __init__(self, deadline: float, clock: Callable[[], float] = time.time):
        self.deadline = deadline
        self.clock = clock

    def left(self) -> float:
        return self.deadline - self.clock()


@dataclass
class Estimator:
    """Seconds a row will take, before it runs: a compile allowance where the load has not compiled
    yet, steps at a FLOP rate measured on full-step rows only (a guess from the matmul until then),
    and per-size allowances for text encoding, decode and PNG encode. Errs long (``margin``)."""

    device_type: str
    config: dict[str, Any]
    rate: float  # FLOP/s of a denoising step
    compile_s: float  # a load's first compile (4 graphs: the first block of each type takes a view)
    margin: float = 1.2
    rate_measured: bool = False
    png: bool = True

    def step_s(self, size: int) -> float:
        if not self.config:  # the tiny model before its load: a CPU step of a few hundred pixels
            return 1.0
        return flops_per_step(self.config, size, size)["total"] / self.rate

    def fixed_s(self, size: int) -> float:
        """Text encode (T5 streamed from CPU memory), decode (exact above 2K: ~3x a plain decode's
        ~185 TFLOP of convolutions at 4K), PNG encode (one CPU core: ~6 s at 4K) and bookkeeping."""
        if self.device_type != "cuda":
            return 0.5 + 2e-7 * size * size
        scale = (size / 4096) ** 2
        return 3.0 + max(8.0 * scale, 2.0) + (max(7.0 * scale, 2.0) if self.png else 0.0)

    def row_s(self, size: int, steps: int, compiled_yet: bool, compiles: bool) -> float:
        compile_s = self.compile_s if compiles and not compiled_yet else 0.0
        return self.margin * (steps * self.step_s(size) + self.fixed_s(size)) + compile_s

    def learn(self, size: int, per_step_s: float) -> None:
        """A full-step row measured this rate (turbo rows skip work: never learned from)."""
        self.rate = flops_per_step(self.config, size, size)["total"] / per_step_s
        self.rate_measured = True


# -- measurements ------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dynamo_compiles() -> int:
    """Graphs dynamo has compiled so far (first compiles and recompiles). ``fullgraph=True`` never
    counts in ``counters["frames"]``; ``unique_graphs`` counts every graph handed to the backend."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def timed(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeat: int = 10) -> float:
    """Median seconds of ``fn`` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def matmul_reference(device: torch.device) -> dict[str, float]:
    """TFLOP/s of a large matrix product measured now (random data): bf16, and fp8 (row-wise scales,
    torch._scaled_mm) where the GPU has it. On a CPU a float32 product of 1024."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    result = {"bf16" if device.type == "cuda" else "float32": 2 * n**3 / timed(lambda: torch.mm(a, b), device) / 1e12}
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        try:
            a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
            sa, sb = torch.ones(n, 1, device=device), torch.ones(1, n, device=device)
            result["fp8"] = 2 * n**3 / timed(lambda: torch._scaled_mm(a8, b8, sa, sb, out_dtype=torch.bfloat16), device) / 1e12
        except Exception as exc:  # noqa: BLE001 - reported instead
            result["fp8_error"] = float("nan")
            print(f"fp8 matmul reference failed: {type(exc).__name__}: {exc}", flush=True)
    return result


class DevicePeak:
    """Device-level memory in use (total - free, all processes and the CUDA context), sampled every
    10 ms in a thread while a row runs; on a CPU the process's resident set."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _used(self) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return int(total - free)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            self._stop.wait(0.01)

    def __enter__(self) -> DevicePeak:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.peak = self._used()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of the luminance over 7x7 windows (the usual constants for 8-bit images)."""
    x = torch.tensor(a, dtype=torch.float64).mean(-1)[None, None]
    y = torch.tensor(b, dtype=torch.float64).mean(-1)[None, None]

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, 7, 1)

    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx**2, mean(y * y) - my**2, mean(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


def short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


# -- the model --------------------------------------------------------------------------------

def preset_for(size: int, sizes: list[int], tiny: bool) -> str:
    """The preset whose settings a row runs: by size on the real model; on the tiny model the
    largest size plays 4K and the others 2K (URAE settings at sizes a CPU runs in seconds)."""
    if tiny:
        return "4k" if size == max(sizes) and len(sizes) > 1 else "2k"
    return REAL_PRESETS.get(size, "2k" if size < 3072 else "4k")


def spec_for(prompt: str, tier: str, size: int, preset: str, steps: int, adapters: tuple[AdapterRef, ...] = ()) -> GenerationSpec:
    return resolve_spec(prompt, preset, width=size, height=size, steps=steps, seed=0, adapters=adapters, tier=tier)


def build_pipeline(tiny: bool, device: torch.device) -> Any:
    if tiny:
        from urae.tiny import build_tiny_pipeline

        return build_tiny_pipeline("tiny", dtype=torch.float32).to(device)
    return build_real_pipeline(device)


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


def offload_t5(generator: Generator, device: torch.device, notes: list[str]) -> None:
    """T5-XXL group-offloaded as a worker runs it; if that fails (at setup or at its first encode) it
    stays resident and the header says so."""
    from urae.memory_profile import remove_group_offload
    from urae.text_encoding import PromptEncoder, has_group_offload

    if device.type != "cuda":
        return
    try:
        if not has_group_offload(generator.pipe.text_encoder_2):
            generator.prompts = PromptEncoder(generator.pipe, generator.model_id, 32, "group")
        generator.prompts.encode("T5 offload check", 512, device)
        sync(device)
        generator.prompts.clear()
    except Exception as exc:  # noqa: BLE001 - the run goes on with T5 resident
        remove_group_offload(generator.pipe.text_encoder_2, device)
        generator.prompts = PromptEncoder(generator.pipe, generator.model_id, 32, "none")
        notes.append(f"T5 group offload failed ({short(exc)}); T5 resident on the GPU")


@dataclass
class Load:
    """One model load and what it serves."""

    generator: Generator
    pipe: Any
    config: dict[str, Any]
    build_s: float
    setup_s: float
    notes: list[str] = field(default_factory=list)
    compiled_yet: bool = False
    counter: StepCounter | None = None
    warmed_sizes: set[int] = field(default_factory=set)


def load_model(args: argparse.Namespace, device: torch.device, paths: dict[str, Path] | None, scratch: Path) -> tuple[Load, dict[str, Path]]:
    started = time.perf_counter()
    pipe = build_pipeline(args.tiny, device)
    sync(device)
    build_s = time.perf_counter() - started
    config = dict(pipe.transformer.config)
    paths = paths or write_adapters(config, scratch, args.tiny)
    profile = "24gb" if args.part == 2 else "default"
    from urae.tiers import supported_tiers

    tiers = [t for t in (("quality", "fast", "turbo") if args.part == 2 else ("quality", "turbo"))
             if t in supported_tiers(device) or args.part == 1]
    notes: list[str] = []
    started = time.perf_counter()
    generator = Generator(
        pipe, "tiny" if args.tiny else "flux-dev-architecture-random", adapter_resolver=lambda name: paths[name],
        hotswap_rank=8 if args.tiny else 48, text_encoder_offload="none", tiers=tiers, compile=args.compile,
        memory_profile=profile,
    )
    offload_t5(generator, device, notes)
    notes += generator.speed.notes
    if device.type == "cuda":
        torch.cuda.empty_cache()
    sync(device)
    return Load(generator, pipe, config, build_s, time.perf_counter() - started, notes), paths


# -- rows -------------------------------------------------------------------------------------

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


class StepCounter:
    """How many times the last block really ran: a step cache skips it on cached steps."""

    def __init__(self, transformer: Any):
        self.block = transformer.single_transformer_blocks[-1]
        self.calls = 0
        self.inner = self.block.forward

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self.inner(*args, **kwargs)

        # Outside any compiled code: the step cache's hooks wrap this from outside in turn.
        self.block.forward = counting

    def uncompile(self) -> None:
        """After a compile failure the block runs its eager forward (what the compiled one wrapped)."""
        self.inner = getattr(self.inner, "_torchdynamo_orig_callable", self.inner)


def generate_with_fallbacks(load: Load, spec: GenerationSpec, device: torch.device, notes: list[str],
                            on_progress: Any = None) -> Any:
    """``generate``, falling back (once each) to eager blocks when compiling fails, and to PyTorch's
    SDPA when the chosen attention kernel fails; ``notes`` says what fell back."""
    speed = load.generator.speed
    try:
        return load.generator.generate(spec, on_progress=on_progress)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        if speed.compiled_blocks > 0:
            speed.fall_back_to_eager(load.pipe.transformer, f"compile failed ({short(exc)})")
            if load.counter is not None:
                load.counter.uncompile()
            notes.append(speed.notes[-1])
        elif speed.attention_backend != "native":
            from urae.models import choose_attention_backend

            failed = speed.attention_for(spec.tier)
            speed.attention_backend = choose_attention_backend(load.pipe.transformer, device, "native")
            speed.fast_attention = "native" if speed.fast_attention else ""
            notes.append(f"attention {failed} failed ({short(exc)}); native")
        else:
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return generate_with_fallbacks(load, spec, device, notes, on_progress)


def run_row(load: Load, tier: str, size: int, preset: str, args: argparse.Namespace, device: torch.device,
            probe_kernel: bool, warm_size: int | None, scratch: Path) -> tuple[dict[str, Any], np.ndarray]:
    notes: list[str] = []
    counter = load.counter
    assert counter is not None
    graphs_before = dynamo_compiles()
    warm_s = 0.0
    if warm_size is not None:
        started = time.perf_counter()
        generate_with_fallbacks(load, spec_for(f"warm-up {tier} {warm_size}", tier, warm_size, preset, 1), device, notes)
        sync(device)
        warm_s = time.perf_counter() - started
        load.warmed_sizes.add(warm_size)
    load.compiled_yet = True
    warm_graphs = dynamo_compiles() - graphs_before

    # The same prompt and seed for every tier of a size, in both parts (PSNR against quality compares
    # like with like); the prompt cache is emptied so that every timed run encodes its prompt.
    spec = spec_for(PROMPT.format(size=size), tier, size, preset, args.steps)
    load.generator.prompts.clear()
    stamps: list[float] = []

    def on_progress(p: Any) -> None:
        if p.stage == "denoise" and p.step > 0:
            sync(device)
            stamps.append(time.perf_counter())

    graphs_before = dynamo_compiles()
    counter.calls = 0
    sync(device)
    with DevicePeak(device) as device_peak:
        started = time.perf_counter()
        result = generate_with_fallbacks(load, spec, device, notes, on_progress)
        sync(device)
        generate_s = time.perf_counter() - started
    computed = counter.calls
    encode_s = 0.0
    if args.png:
        started = time.perf_counter()
        save_image(result.images[0], result.metadata[0], scratch / f"{tier}_{size}.png")
        encode_s = time.perf_counter() - started
    timed_graphs = dynamo_compiles() - graphs_before

    t = result.timings
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    # Mean over steps 2..n (the first carries one-off work): a step cache makes steps uneven.
    per_step = statistics.fmean(gaps) if gaps else t["denoise"] / args.steps
    flops = flops_per_step(load.config, size, size, spec.max_sequence_length)["total"]
    full_steps = computed == args.steps
    meta = result.metadata[0]
    kernel = attention_kernel(load.generator, spec, device) if probe_kernel else "(as above)"
    row: dict[str, Any] = {
        "part": args.part, "tier": tier, "size": size, "preset": preset, "profile": meta.get("memory_profile"),
        "precision": meta.get("precision"), "steps": args.steps, "computed_steps": computed, "warm_up_s": warm_s,
        "warm_up_size": warm_size,
        "per_step_s": per_step,
        # A step cache computes fewer blocks than it runs steps: count the FLOPs of the steps computed.
        "tflops": flops * computed / args.steps / per_step / 1e12,
        "text_encode_s": t["text_encode"], "denoise_s": t["denoise"], "decode_s": t["decode"],
        "vae_decode": meta.get("vae_decode"), "encode_s": encode_s if args.png else None,
        "end_to_end_s": generate_s + encode_s,
        # Extrapolating 28 steps from a few is fair only when every step is computed.
        "est_28_steps_s": t["text_encode"] + 28 * per_step + t["decode"] + encode_s if full_steps else None,
        "attention_backend": meta.get("attention_backend", "?"), "kernel": kernel,
        "graphs_warm_up": warm_graphs, "graphs_timed_run": timed_graphs, "compiled": meta.get("compiled"),
        "adapters": [a["name"] for a in meta.get("adapters", [])], "notes": notes,
    }
    if device.type == "cuda":
        row.update(peak_allocated_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30,
                   peak_device_gib=device_peak.peak / 2**30)
    else:
        row.update(peak_allocated_gib=None, peak_reserved_gib=None, peak_device_gib=device_peak.peak / 2**30)
    return row, np.asarray(result.images[0])


def hotswap_row(load: Load, size: int, preset: str, tier: str, device: torch.device) -> dict[str, Any]:
    """Median time of swapping the user adapter (activate, synchronised), and graphs compiled by
    generating with one user adapter, then the other (1 step each, after one at this size)."""
    generator = load.generator
    manager = generator.adapters
    for name in ("swap-a", "swap-b"):
        target = generator.resolve_adapter(name)
        path, sha = target if isinstance(target, tuple) else (target, None)
        manager.ensure(name, path, sha)
    preset_refs = tuple(spec_for("hot-swap", tier, size, preset, 1).adapters)
    times = []
    for i in range(8):
        refs = [*preset_refs, AdapterRef("swap-a" if i % 2 else "swap-b", 1.0)]
        sync(device)
        started = time.perf_counter()
        manager.activate(refs)
        sync(device)
        times.append(time.perf_counter() - started)
    generator.generate(spec_for("hot-swap", tier, size, preset, 1, (AdapterRef("swap-a"),)))
    before = dynamo_compiles()
    for name in ("swap-b", "swap-a"):
        generator.generate(spec_for("hot-swap", tier, size, preset, 1, (AdapterRef(name),)))
    sync(device)
    return {"swap_ms": statistics.median(times[2:]) * 1000, "swap_ms_all": [round(x * 1000, 3) for x in times],
            "graphs_after_swaps": dynamo_compiles() - before, "size": size, "tier": tier,
            "rank": manager.rank}


def attention_rows(device: torch.device, tokens: list[int], heads: int, head_dim: int) -> list[dict[str, Any]]:
    """Attention alone at (1, N, heads, head_dim) for every backend that runs here: median time,
    TFLOP/s (4 N^2 heads head_dim), relative error against the first exact kernel that ran."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
        dispatch_attention_fn,
    )

    from urae.attention import (
        INT8_ATTENTION,
        INT8_BACKEND,
        attention_scale_problem,
        install_int8_kernel,
        register_int8_backend,
        sage_int8_kernel,
    )

    register_int8_backend()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows: list[dict[str, Any]] = []
    for n in tokens:
        gen = torch.Generator(device="cpu").manual_seed(n)
        q, k, v = (torch.randn(1, n, heads, head_dim, generator=gen).to(device, dtype) for _ in range(3))
        reference: tuple[str, torch.Tensor] | None = None
        for name in ATTENTION_BACKENDS:
            row: dict[str, Any] = {"tokens": n, "backend": name}
            rows.append(row)
            try:
                if name == INT8_BACKEND:
                    # Timed whatever it measures (a worker keeps it for fast only where it is faster
                    # and accurate: urae.attention.int8_attention_problem).
                    if device.type != "cuda":
                        row["note"] = "sageattention's Triton kernels need a CUDA GPU"
                        continue
                    import sageattention  # noqa: F401 - its absence or Triton's is the row's note

                    install_int8_kernel(sage_int8_kernel)
                    INT8_ATTENTION.select(int8=True, exact_backend=reference[0] if reference else "native")
                    row["note"] = attention_scale_problem(INT8_BACKEND, device) or "applies the scale it is given"
                else:
                    _check_attention_backend_requirements(AttentionBackendName(name))
                out = dispatch_attention_fn(q, k, v, backend=name)
                seconds = timed(lambda name=name, q=q, k=k, v=v: dispatch_attention_fn(q, k, v, backend=name), device, 2, 5)
                row.update(ms=seconds * 1000, tflops=4 * n * n * heads * head_dim / seconds / 1e12)
                if reference is None and name != INT8_BACKEND:
                    reference = (name, out)
                    row["error_vs"] = name
                elif reference is not None:
                    row["relative_error"] = float((out.float() - reference[1].float()).norm() / reference[1].float().norm())
                    row["error_vs"] = reference[0]
            except Exception as exc:  # noqa: BLE001 - a backend that does not run is reported, not fatal
                row["note"] = short(exc)
            finally:
                INT8_ATTENTION.enabled = False
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def lora_share(load: Load, device: torch.device, sizes: list[int], per_step: dict[int, float], text_tokens: int) -> dict[str, Any]:
    """The adapter slots' time per step, measured on one slot layer (compiled like the blocks when
    they are), with its slots on and off, at each token count a step runs them at, times the number
    of slot layers; against the measured quality step. Requests without adapters can skip it
    (URAE_IDLE_ADAPTER_SLOTS=skip) where it is over 2 %."""
    transformer = load.pipe.transformer
    layer = transformer.single_transformer_blocks[0].attn.to_q
    cfg = load.config
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    compiled = load.generator.speed.compiled_blocks > 0
    run = torch.compile(layer, dynamic=True) if compiled else layer
    result: dict[str, Any] = {"compiled": compiled, "slot_rank": load.generator.adapters.rank,
                              "slots": load.generator.adapters.slot_count, "sizes": {}}
    dtype = layer.lora_A[next(iter(layer.lora_A))].weight.dtype
    try:
        for size in sizes:
            image = (size // 16) ** 2
            # Where the slot layers run: single blocks q/k/v over text + image tokens, double blocks
            # q/k/v/out over image tokens and add_q/k/v/out over text tokens.
            counts = {image + text_tokens: 3 * cfg["num_single_layers"], image: 4 * cfg["num_layers"],
                      text_tokens: 4 * cfg["num_layers"]}
            total = 0.0
            for n, layers in counts.items():
                x = torch.randn(1, n, width, device=device, dtype=dtype)
                with torch.no_grad():
                    layer.enable_adapters(True)
                    on = timed(lambda x=x: run(x), device, 2, 5)
                    layer.enable_adapters(False)
                    off = timed(lambda x=x: run(x), device, 2, 5)
                total += layers * max(on - off, 0.0)
            share = total / per_step[size] if size in per_step else None
            result["sizes"][size] = {"slots_ms_per_step": total * 1000, "share_of_step": share}
    finally:
        layer.enable_adapters(True)
    return result


# -- the run ------------------------------------------------------------------------------------

@dataclass
class Task:
    """One thing a part runs: ``estimate`` seconds (asked before anything of it starts)."""

    name: str
    estimate: Callable[[], float]
    run: Callable[[], None]


def run_tasks(tasks: list[Task], budget: Budget, skipped: list[str], on_done: Callable[[], None]) -> None:
    """Run each task whose estimate fits the time left; list the others with the reason. A task that
    fails is listed with its error (and its traceback printed): the run goes on to the next."""
    for task in tasks:
        needed = task.estimate()
        left = budget.left()
        if needed > left:
            skipped.append(f"{task.name} (needs ~{needed:.0f} s, {max(left, 0):.0f} s left)")
            print(f"skip {task.name}: needs ~{needed:.0f} s, {left:.0f} s left", flush=True)
            continue
        try:
            task.run()
        except Exception as exc:  # noqa: BLE001 - one failing task must not lose the others' table
            traceback.print_exc()
            skipped.append(f"{task.name}: failed: {short(exc)}")
        on_done()


def row_line(r: dict[str, Any]) -> str:
    def num(value: Any, fmt: str) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    if "error" in r:
        return f"| {r['part']} | {r['tier']} | {r['size']} | {r.get('profile', '')} | error: {r['error']} |" + " |" * 16
    q = r.get("psnr_vs_quality")
    q_text = "-" if q is None else ("inf" if math.isinf(q) else f"{q:.1f}")
    notes = "; ".join(r.get("notes", []))
    return (
        f"| {r['part']} | {r['tier']} | {r['size']} | {r['profile']} {r['precision']} | {r['computed_steps']}/{r['steps']} | "
        f"{r['per_step_s']:.3f} | {r['tflops']:.3g} | {num(r.get('matmul_share'), '.0%')} | {r['text_encode_s']:.2f} | "
        f"{r['denoise_s']:.2f} | {r['decode_s']:.2f} {r['vae_decode']} | {num(r['encode_s'], '.2f')} | {r['end_to_end_s']:.2f} | "
        f"{num(r['est_28_steps_s'], '.1f')} | {num(r['peak_allocated_gib'], '.2f')} / {num(r['peak_reserved_gib'], '.2f')} / "
        f"{num(r['peak_device_gib'], '.2f')} | {r['attention_backend']} / {r['kernel']} | "
        f"{r['graphs_warm_up']} / {r['graphs_timed_run']} | {q_text} | {num(r.get('ssim_vs_quality'), '.3f')} | "
        f"{num(r.get('vs_bf16'), '.2f')} | {notes} |"
    )


TABLE_HEAD = [
    "| part | tier | size | profile | steps computed/run | s/step | TFLOP/s | of matmul | text s | denoise s | decode s | "
    "PNG s | end-to-end s | 28-step est s | peak GiB alloc / reserved / device | attention backend / kernel | "
    "graphs warm-up / timed | PSNR vs quality dB | SSIM | s/step vs bf16 quality | notes |",
    "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---|---|---:|---:|---:|---|",
]


def report_lines(state: dict[str, Any]) -> list[str]:
    lines = [*state["header"], "", *TABLE_HEAD, *(row_line(r) for r in state["rows"])]
    swap = state.get("hotswap")
    if swap is not None:
        if "error" in swap:
            lines.append(f"\nhot-swap: error: {swap['error']}")
        else:
            lines.append(f"\nhot-swap (user adapter, slot rank {swap['rank']}, activate + sync): median "
                         f"{swap['swap_ms']:.2f} ms; graphs compiled over two swapped generations: {swap['graphs_after_swaps']}")
    if state.get("attention"):
        lines += ["", "| attention alone: tokens | backend | ms | TFLOP/s | relative error (vs) | note |",
                  "|---:|---|---:|---:|---|---|"]
        for a in state["attention"]:
            error = f"{a['relative_error']:.2e} ({a['error_vs']})" if "relative_error" in a else (
                "reference" if "error_vs" in a else "")
            ms = f"{a['ms']:.2f}" if "ms" in a else "-"
            tf = f"{a['tflops']:.3g}" if "tflops" in a else "-"
            lines.append(f"| {a['tokens']} | {a['backend']} | {ms} | {tf} | {error} | {a.get('note', '')} |")
    share = state.get("lora_share")
    if share:
        for size, s in share.get("sizes", {}).items():
            part = "-" if s["share_of_step"] is None else f"{s['share_of_step']:.1%} of the quality step"
            verdict = "" if s["share_of_step"] is None else (
                " (over 2 %: URAE_IDLE_ADAPTER_SLOTS=skip pays)" if s["share_of_step"] > 0.02 else " (under 2 %)")
            lines.append(f"adapter slots at {size}: {s['slots_ms_per_step']:.1f} ms per step, {part}{verdict} "
                         f"[{share['slots']} slots of rank {share['slot_rank']}, {'compiled' if share['compiled'] else 'eager'}]")
    if state.get("lora_share_error"):
        lines.append(f"adapter slots: error: {state['lora_share_error']}")
    lines += [f"skipped: {s}" for s in state["skipped"]]
    lines += ["", "FLOPs per step (real FLUX.1-dev architecture, 512 text tokens):"]
    for size in (1024, 2048, 4096):
        f = flops_per_step(FLUX_DEV_TRANSFORMER, size, size)
        lines.append(f"  {size} px: N={int(f['tokens'])}, total {f['total'] / 1e12:.1f} TFLOP, linear "
                     f"{f['linear'] / 1e12:.1f}, attention {f['attention'] / 1e12:.1f} ({f['attention'] / f['total']:.0%})")
    lines.append(f"wall time {state['wall_s']:.1f} s (deadline {state['deadline_left_s']:.0f} s after it)")
    return lines


def save_samples(images: dict[int, dict[str, np.ndarray]], out: Path, part: int) -> None:
    """One JPEG per size: the tiers side by side (downscaled) on top, a full-resolution centre crop of
    each below (where detail differences show)."""
    for size, by_tier in images.items():
        tiles = list(by_tier.items())
        thumb, crop = min(768, size), min(512, size)
        sheet = Image.new("RGB", (max(thumb, crop) * len(tiles), thumb + crop), "white")
        for i, (_, array) in enumerate(tiles):
            image = Image.fromarray(array)
            x = i * max(thumb, crop)
            sheet.paste(image.resize((thumb, thumb), Image.LANCZOS), (x, 0))
            left, top = (image.width - crop) // 2, (image.height - crop) // 2
            sheet.paste(image.crop((left, top, left + crop, top + crop)), (x, thumb))
        sheet.save(out / f"samples_part{part}_{size}_{'-'.join(name for name, _ in tiles)}.jpg", quality=92)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", type=int, choices=(1, 2), default=1)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (seconds)")
    parser.add_argument("--device", default=None, help="cuda:N (default cuda:0) or cpu")
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (part 1: 4, part 2: 3; tiny 2)")
    parser.add_argument("--deadline", type=float, default=None, help="end of the run, seconds since the epoch")
    parser.add_argument("--budget-s", type=float, default=None, help="or: seconds from now (default 360; tiny 120)")
    parser.add_argument("--compile-s", type=float, default=None,
                        help="allowance for a load's first compile (default on CUDA: part 1 150 s, 4 graphs at 80-150 s "
                             "on an H100; part 2 120 s, compiled at 2K with part 1's inductor and Triton caches)")
    parser.add_argument("--out", type=Path, default=None, help="folder for table.md, rows.json and sample sheets")
    parser.add_argument("--reference-dir", type=Path, default=None,
                        help="part 1 writes its quality images and rows here, part 2 compares with them")
    parser.add_argument("--compile", default=None, choices=("on", "off", "eager"),
                        help="default: on CUDA only; eager: dynamo without code generation (CPU tests)")
    parser.add_argument("--attention-tokens", type=int, nargs="+", default=None,
                        help="sequence lengths of the attention-alone rows (default 16896 66048: 2K and 4K with 512 text tokens)")
    parser.add_argument("--no-hotswap", action="store_true")
    parser.add_argument("--png", default=None, choices=("on", "off"), help="encode each image as PNG (default: part 1)")
    args = parser.parse_args(argv)
    args.png = args.part == 1 if args.png is None else args.png == "on"
    args.compile = {None: None, "on": True, "off": False, "eager": "eager"}[args.compile]
    args.steps = args.steps or (2 if args.tiny else (4 if args.part == 1 else 3))
    args.sizes = sorted(args.sizes or ([64, 128] if args.tiny else [2048, 4096]))
    if args.deadline is None:
        args.deadline = time.time() + (args.budget_s or (120.0 if args.tiny else 360.0))
    args.attention_tokens = args.attention_tokens or ([256, 512] if args.tiny else [16896, 66048])
    return args


def _stop_on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.deadline)
    wall_start = time.time()
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
    reference_dir = args.reference_dir
    scratch = Path(tempfile.mkdtemp(prefix="urae-bench-"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    state: dict[str, Any] = {"header": [], "rows": [], "hotswap": None, "attention": [], "skipped": [],
                             "lora_share": None, "wall_s": 0.0, "deadline_left_s": 0.0}
    images: dict[int, dict[str, np.ndarray]] = {}

    def save_state() -> None:
        state["wall_s"] = time.time() - wall_start
        state["deadline_left_s"] = budget.left()
        text = json.dumps(state, indent=1, default=str)
        if out is not None:
            (out / "rows.json").write_text(text)
        if args.part == 1 and reference_dir is not None and state["rows"]:
            reference_dir.mkdir(parents=True, exist_ok=True)
            (reference_dir / "rows.json").write_text(text)

    sizes = args.sizes
    config = FLUX_DEV_TRANSFORMER if not args.tiny else None
    estimator = Estimator(device.type, {}, 1.0, 0.0)
    loads: dict[str, Load] = {}
    probed: set[str] = set()
    part1_rows: dict[tuple[str, int], dict[str, Any]] = {}
    if args.part == 2 and reference_dir is not None and (reference_dir / "rows.json").exists():
        for r in json.loads((reference_dir / "rows.json").read_text()).get("rows", []):
            if "error" not in r:
                part1_rows[(r["tier"], r["size"])] = r
    cap: dict[str, Any] = {}
    load_failure: dict[str, str] = {}
    current = ""
    try:
        # 1. References measured in this run: the matmul ceiling (and the FLOP-rate guess until a row runs).
        try:
            matmul = matmul_reference(device)
        except Exception as exc:  # noqa: BLE001 - rows still run; their share of a matmul is then missing
            traceback.print_exc()
            matmul = {}
            state["header"].append(f"matmul reference failed: {short(exc)}")
        state["matmul_tflops"] = matmul
        ceiling = matmul.get("bf16", matmul.get("float32", 0.0)) * 1e12 or (790e12 if device.type == "cuda" else 2e10)
        # 2. The load (the first task's estimate includes it: nothing is built that would not fit).
        compile_s = args.compile_s if args.compile_s is not None else (
            (150.0 if args.part == 1 else 120.0) if device.type == "cuda" else 20.0)
        estimator = Estimator(device.type, dict(config or {}), 0.45 * ceiling, compile_s, png=args.png)
        if (("quality", sizes[-1]) in part1_rows) and config is not None:
            # Part 1's bf16 step at the largest size on this machine: 8-bit weights are not slower.
            estimator.learn(sizes[-1], part1_rows[("quality", sizes[-1])]["per_step_s"])
        load_s = 60.0 if device.type == "cuda" else 5.0

        def ensure_load() -> Load:
            if "error" in load_failure:
                raise RuntimeError(f"the model did not load: {load_failure['error']}")
            if "model" not in loads:
                try:
                    load, _ = load_model(args, device, None, scratch)
                except Exception as exc:
                    load_failure["error"] = short(exc)
                    state["header"].append(f"model load failed: {short(exc)}")
                    raise
                loads["model"] = load
                load.counter = StepCounter(load.pipe.transformer)
                estimator.config = load.config
                resident = f"{torch.cuda.memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a (CPU)"
                params = sum(p.numel() for p in load.pipe.transformer.parameters())
                caps = load.generator.capabilities()
                state["header"] += [
                    f"device: {name} ({device}); torch {torch.__version__}; part {args.part}; model: "
                    f"{load.generator.model_id}, transformer {params / 1e9:.2f} B parameters; built in {load.build_s:.1f} s, "
                    f"generator set up in {load.setup_s:.1f} s; resident after load {resident}; "
                    f"T5 offload: {load.generator.prompts.offload}",
                    f"capabilities: {json.dumps(caps, default=str)}",
                    "matmul measured in this run (TFLOP/s): " + ", ".join(f"{k} {v:.3g}" for k, v in matmul.items()),
                    f"steps timed per row: {args.steps}; s/step = mean of the gaps between step stamps 2..n; TFLOP/s counts "
                    "the steps computed; 28-step estimate = text + 28 x s/step + decode + PNG (full-step rows only)",
                    *(f"fallback: {n}" for n in load.notes),
                ]
                print("\n".join(state["header"]), flush=True)
            return loads["model"]

        def needs_load() -> float:
            return 0.0 if "model" in loads else load_s

        def row_task(tier: str, size: int, capped: bool | None = None) -> Task:
            label = f"{tier} {size} px" + ("" if capped is None else (" capped at 24 GB" if capped else " uncapped"))

            def warm_size() -> int | None:
                """Part 1 warms each size up once; part 2 only compiles, at the smallest size (with dynamic
                shapes one compile serves every size; a timed run's first step is not in s/step)."""
                load = loads.get("model")
                if args.part == 1:
                    return size if load is None or size not in load.warmed_sizes else None
                return sizes[0] if load is None or not load.compiled_yet else None

            def estimate() -> float:
                compiles = args.compile not in (None, False) or (args.compile is None and device.type == "cuda")
                load = loads.get("model")
                warm = warm_size()
                steps = args.steps + (1 if size == sizes[0] and tier not in probed else 0)
                compiled_yet = load is not None and load.compiled_yet
                warm_s = estimator.margin * estimator.step_s(warm) if warm else 0.0
                return needs_load() + estimator.row_s(size, steps, compiled_yet, compiles) + warm_s

            def run() -> None:
                nonlocal current
                current = label
                load = ensure_load()
                if tier not in load.generator.speed.tiers:
                    state["skipped"].append(f"{label}: {load.generator.speed.fast_refusal or 'not served by this load'}")
                    return
                if capped is not None and device.type == "cuda":
                    set_cap(capped)
                elif capped is not None and not cap.get("noted"):
                    cap["noted"] = True
                    state["header"].append("cap: not applied (no CUDA device); capped and uncapped rows run alike")
                preset = preset_for(size, sizes, args.tiny)
                try:
                    # Warm-up at each size once per load (compiles the first time; with dynamic shapes a
                    # new size or tier on the same load compiles nothing, the timed run shows it if it does).
                    probe = size == sizes[0] and tier not in probed
                    row, image = run_row(load, tier, size, preset, args, device, probe, warm_size(), scratch)
                except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
                    state["rows"].append({"part": args.part, "tier": tier, "size": size, "error": short(exc),
                                          "profile": load.generator.speed.memory.profile})
                    print(f"{label}: {short(exc)}", flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    return
                if probe:
                    probed.add(tier)
                row["capped_at_gib"] = cap.get("gib") if cap.get("on") else None
                if capped is not None and device.type == "cuda":
                    row["notes"].append("capped at 24 GB" if capped else "uncapped")
                row["matmul_share"] = row["tflops"] * 1e12 / ceiling if matmul else None
                # Rows that skip work (a step cache) would make later rows look cheaper than they are.
                row["rate_learned"] = row["computed_steps"] == row["steps"] and tier != "turbo"
                if row["rate_learned"]:
                    estimator.learn(size, row["per_step_s"])
                reference = images.get(size, {}).get("quality")
                if reference is None and args.part == 2 and reference_dir is not None:
                    path = reference_dir / f"quality_{size}.npy"
                    reference = np.load(path) if path.exists() else None
                if reference is not None and not (args.part == 1 and tier == "quality"):
                    row["psnr_vs_quality"], row["ssim_vs_quality"] = psnr(image, reference), ssim(image, reference)
                bf16 = part1_rows.get(("quality", size)) if args.part == 2 else None
                row["vs_bf16"] = row["per_step_s"] / bf16["per_step_s"] if bf16 else None
                if args.part == 1 and tier == "quality" and reference_dir is not None:
                    reference_dir.mkdir(parents=True, exist_ok=True)
                    np.save(reference_dir / f"quality_{size}.npy", image)
                images.setdefault(size, {})[tier if capped is None else f"{tier}-{'capped' if capped else 'uncapped'}"] = image
                state["rows"].append(row)
                print(row_line(row), flush=True)

            return Task(label, estimate, run)

        def set_cap(on: bool) -> None:
            """Cap the caching allocator so that it, plus what the CUDA context holds outside it,
            stays within 24 GB of device memory."""
            if cap.get("on") == on:
                return
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(device)
            outside = (total - free) - torch.cuda.memory_reserved(device)  # context, cuBLAS/cuDNN handles
            if on:
                fraction = max(min((CAP_BYTES - outside) / total, 1.0), 0.01)
                torch.cuda.set_per_process_memory_fraction(fraction, device)
                cap.update(on=True, gib=fraction * total / 2**30, outside_gib=outside / 2**30)
                state["header"].append(f"cap: allocator limited to {fraction * total / 2**30:.2f} GiB "
                                       f"(24 GB less {outside / 2**30:.2f} GiB held outside it)")
            else:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
                cap["on"] = False

        def hotswap_task(size: int) -> Task:
            def run() -> None:
                nonlocal current
                current = f"hot-swap {size} px"
                load = ensure_load()
                try:
                    state["hotswap"] = hotswap_row(load, size, preset_for(size, sizes, args.tiny), "quality", device)
                    print(f"hot-swap: {state['hotswap']['swap_ms']:.2f} ms, graphs {state['hotswap']['graphs_after_swaps']}", flush=True)
                except Exception as exc:  # noqa: BLE001
                    state["hotswap"] = {"error": short(exc)}

            return Task(f"hot-swap {size} px", lambda: needs_load() + estimator.row_s(size, 4, True, False), run)

        def attention_task() -> Task:
            heads, head_dim = FLUX_DEV_TRANSFORMER["num_attention_heads"], FLUX_DEV_TRANSFORMER["attention_head_dim"]

            def estimate() -> float:
                work = sum(4 * n * n * heads * head_dim for n in args.attention_tokens)
                # + the Triton compile of the 8-bit kernels at their first call, on a GPU
                return 10.0 + (20.0 if device.type == "cuda" else 0.0) + 1.3 * len(ATTENTION_BACKENDS) * 9 * work / (0.3 * ceiling)

            def run() -> None:
                nonlocal current
                current = "attention alone"
                state["attention"] = attention_rows(device, args.attention_tokens, heads, head_dim)

            return Task("attention alone", estimate, run)

        def lora_task() -> Task:
            def run() -> None:
                nonlocal current
                current = "adapter slots' share"
                load = ensure_load()
                per_step = {r["size"]: r["per_step_s"] for r in state["rows"] if r.get("tier") == "quality" and "error" not in r}
                try:
                    state["lora_share"] = lora_share(load, device, sizes, per_step, 512)
                except Exception as exc:  # noqa: BLE001
                    state["lora_share_error"] = short(exc)

            return Task("adapter slots' share", lambda: needs_load() + (40.0 if device.type == "cuda" else 5.0), run)

        small, large = sizes[0], sizes[-1]
        if args.part == 1:
            tasks = [row_task("quality", small), row_task("quality", large)]
            tasks += [] if args.no_hotswap else [hotswap_task(small)]
            tasks += [row_task("turbo", large), attention_task(), lora_task()]
        else:
            tasks = [row_task("quality", large, capped=True), row_task("fast", large, capped=True),
                     row_task("quality", small, capped=True), row_task("fast", small, capped=True),
                     row_task("quality", large, capped=False)]
        run_tasks(tasks, budget, state["skipped"], save_state)
    except KeyboardInterrupt:  # the script's hard time limit: keep what ran, write the table
        state["skipped"].append(f"interrupted by the time limit during {current}; later rows did not run")
        print(f"interrupted during {current}", flush=True)
    finally:
        if cap.get("on"):
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    save_state()
    lines = report_lines(state)
    if out is not None:
        (out / "table.md").write_text("\n".join(lines) + "\n")
        save_samples(images, out, args.part)
    print("\n".join(lines[len(state["header"]):]), flush=True)
    ok = bool(state["rows"]) and all("error" not in r for r in state["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
