"""Adapter hot-swap cost on the CPU with FLUX.1's real module count (19 double + 38 single blocks).

The transformer is narrow (so it fits a small machine) but has every block, every attention layer and
so every module a swap walks; the adapters are rank 48 on URAE's 190 matrices, the layout of the
converted 4K adapter. It times, in one run:

- before: the adapter manager of commit ``--before`` (default: the last one before fixed slots),
  loaded from git: a swap re-validates the file and walks the model through diffusers/peft;
- after: ``urae.adapters.AdapterManager``: files validated once, a swap is one batched copy of cached
  tensors into a fixed slot, and nothing at all when the slot already holds the adapter;
- the batched copy alone at the real width (3072): the bytes a real swap moves. On CUDA the same copy
  goes from pinned memory to the GPU asynchronously; here it is a CPU memcpy.

    python bench/hotswap.py            # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch

from urae.adapters import AdapterManager, save_lora
from urae.adapters.builtin import tiny_lora_layers
from urae.spec import AdapterRef
from urae.tiny import build_tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent
BEFORE_COMMIT = "0be5212"  # the last commit with the per-swap diffusers/peft path


def narrow_real_depth_pipeline() -> Any:
    """The tiny pipeline with a transformer of FLUX.1's depth: 19 double and 38 single blocks."""
    from diffusers import FluxTransformer2DModel

    pipe = build_tiny_pipeline("tiny")
    config = dict(pipe.transformer.config)
    config.update(num_layers=19, num_single_layers=38)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel.from_config(config).eval().requires_grad_(False)
    pipe.register_modules(transformer=transformer)
    return pipe


def old_manager_class(commit: str) -> type | None:
    """AdapterManager as it was at ``commit`` (None when git or the commit is not available)."""
    try:
        source = subprocess.run(
            ["git", "show", f"{commit}:urae/adapters/manager.py"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("manager_before")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{commit}:urae/adapters/manager.py", "exec"), module.__dict__)
    cls: type = module.AdapterManager
    return cls


def time_ms(fn: Any, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def summary(times: list[float]) -> str:
    return f"median {statistics.median(times):8.2f} ms   min {min(times):8.2f} ms   (n={len(times)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--before", default=BEFORE_COMMIT, help="commit whose manager is the 'before' figure")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    folder = Path(tempfile.mkdtemp(prefix="hotswap-bench-"))
    pipe = narrow_real_depth_pipeline()
    t = pipe.transformer
    files = [save_lora(folder / f"{i}.safetensors", tiny_lora_layers(t, seed=i, rank=48)) for i in range(2)]
    modules = sum(1 for _ in t.modules())
    print(f"transformer: {len(t.transformer_blocks)} double + {len(t.single_transformer_blocks)} single blocks, "
          f"width {t.inner_dim}, {modules} modules; adapters: rank 48 on 190 matrices, "
          f"{files[0].stat().st_size / 1e6:.1f} MB each; torch threads {torch.get_num_threads()}")

    old_cls = old_manager_class(args.before)
    old_median = None
    if old_cls is None:
        print(f"before ({args.before}): not available (no git checkout)")
    else:
        old_pipe = narrow_real_depth_pipeline()
        old = old_cls(old_pipe, capacity=1, hotswap_rank=48)
        old.ensure("0", files[0])
        old.activate([AdapterRef("0", 1.0)])
        state = {"i": 0}

        def old_swap() -> None:
            state["i"] ^= 1
            name = str(state["i"])
            old.ensure(name, files[state["i"]])  # capacity 1: evicts the other, swaps in place
            old.activate([AdapterRef(name, 1.0)])

        old_swap()
        times = time_ms(old_swap, args.repeat)
        old_median = statistics.median(times)
        print(f"before ({args.before}) swap, ensure + activate:          {summary(times)}")

    manager = AdapterManager(pipe, capacity=4, rank=48, slots=2)
    t0 = time.perf_counter()
    for i, path in enumerate(files):
        manager.ensure(str(i), path)
    print(f"after: validate + hash + lay out both files once:      {(time.perf_counter() - t0) * 1000:8.2f} ms")
    manager.activate([AdapterRef("0", 1.0)])
    state = {"i": 0}

    def new_swap() -> None:
        # A user adapter swap in the one-slot-per-request case: slot_1 gets the other adapter.
        state["i"] ^= 1
        name = str(state["i"])
        manager.ensure(name, files[state["i"]])
        manager.activate([AdapterRef(name, 1.0)])

    # Two slots: alternating two adapters would find both in place; force a real copy each time.
    manager_one = AdapterManager(narrow_real_depth_pipeline(), capacity=4, rank=48, slots=1)
    for i, path in enumerate(files):
        manager_one.ensure(str(i), path)
    state_one = {"i": 0}

    def new_swap_copy() -> None:
        state_one["i"] ^= 1
        name = str(state_one["i"])
        manager_one.ensure(name, files[state_one["i"]])
        manager_one.activate([AdapterRef(name, 1.0)])

    new_swap_copy()
    copy_times = time_ms(new_swap_copy, args.repeat)
    print(f"after swap (one batched copy), ensure + activate:      {summary(copy_times)}")
    new_swap()
    same_times = time_ms(new_swap, args.repeat)
    print(f"after, adapter already in a slot (no copy):            {summary(same_times)}")
    weights = [0.5, 1.0]
    weight_times = time_ms(lambda: manager.activate([AdapterRef("0", weights.reverse() or weights[0])]), args.repeat)
    print(f"after, weight change only:                             {summary(weight_times)}")

    # The bytes of a real-width swap: 190 matrices, A (48 x 3072) and B (3072 x 48), bfloat16.
    src = [torch.randn(48, 3072).to(torch.bfloat16) if i % 2 == 0 else torch.randn(3072, 48).to(torch.bfloat16)
           for i in range(380)]
    dst = [torch.empty_like(x) for x in src]
    real_times = time_ms(lambda: torch._foreach_copy_(dst, src), args.repeat)
    mb = sum(x.numel() * x.element_size() for x in src) / 1e6
    print(f"batched copy alone at width 3072 ({mb:.0f} MB bf16):     {summary(real_times)}")
    if old_median is not None:
        print(f"swap speed-up (median, same run): {old_median / statistics.median(copy_times):.1f}x")


if __name__ == "__main__":
    sys.exit(main())
