"""Training step time and peak memory for LoRA and minor-component adaptation.

CPU (default): the tiny FLUX model at 256 px, float32.
    python bench/train_step.py
GPU (--real): the real FLUX.1-dev transformer architecture (19 double + 38 single blocks, width 3072)
with random bf16 weights (no download), random text embeddings of the real shapes (T5 512 x 4096,
CLIP 768), 2048 px, batch 1, gradient checkpointing, bf16 autocast, rank 16 on URAE's 190 matrices.
    python bench/train_step.py --real
Each adapter kind runs in its own process so that peak memory is measured per kind (CUDA: peak
allocated; CPU: peak resident set size of the process). The step is the library's own: the same
adapter layers and flow-matching loss that ``urae train`` uses.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

# FLUX.1-dev's transformer configuration.
REAL_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
REAL_TEXT_TOKENS = 512


def build_transformer(args: argparse.Namespace) -> tuple[torch.nn.Module, int, int, int]:
    """(transformer, latent channels, T5 tokens, T5 width) with random weights on the device."""
    if not args.real:
        from urae.tiny import build_tiny_pipeline

        transformer = build_tiny_pipeline("tiny").transformer.to(args.device)
        return transformer, 4, 64, transformer.config.joint_attention_dim
    from diffusers import FluxTransformer2DModel

    config = dict(REAL_CONFIG, num_layers=args.double_blocks, num_single_layers=args.single_blocks)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(args.device):
            transformer = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(default_dtype)
    transformer.requires_grad_(False)
    return transformer, 16, REAL_TEXT_TOKENS, config["joint_attention_dim"]


def run_kind(args: argparse.Namespace) -> dict[str, float | str]:
    from urae.train.adapter_layers import install_adapters, resolve_targets
    from urae.train.flow_matching import flow_matching_loss

    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    transformer, channels, tokens, text_dim = build_transformer(args)
    dtype = torch.bfloat16 if args.real else torch.float32
    paths = resolve_targets(transformer, "urae")
    started = time.perf_counter()
    layers = install_adapters(transformer, args.kind, paths, args.rank)
    if cuda:
        torch.cuda.synchronize()
    init_s = time.perf_counter() - started
    if not args.no_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    params = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    latent_side = args.size // 8
    latents = torch.randn(1, channels, latent_side, latent_side, device=device, dtype=dtype)
    noise = torch.randn_like(latents)
    embeds = torch.randn(1, tokens, text_dim, device=device, dtype=dtype)
    pooled = torch.randn(1, transformer.config.pooled_projection_dim, device=device, dtype=dtype)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.real):
            loss = flow_matching_loss(transformer, latents, embeds, pooled, torch.tensor([0.5]), noise, 1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    if cuda:
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    times.sort()
    return {
        "kind": args.kind,
        "device": str(device),
        "size": args.size,
        "matrices": len(paths),
        "trainable_params": sum(p.numel() for p in params),
        "init_s": round(init_s, 3),
        "step_s_median": round(times[len(times) // 2], 4),
        "step_s_min": round(times[0], 4),
        "peak_mib": round(peak_mib, 1),
        "peak_kind": "cuda max allocated" if cuda else "process max RSS",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="the FLUX.1-dev architecture (GPU)")
    parser.add_argument("--device", default=None, help="default: cuda with --real, else cpu")
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 2048 real, 256 tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5 real, 20 tiny)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--kinds", default="lora,minor_components")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--double-blocks", type=int, default=19, help="shrink the real architecture (smoke test)")
    parser.add_argument("--single-blocks", type=int, default=38)
    parser.add_argument("--kind", help=argparse.SUPPRESS)  # set for the per-kind child process
    args = parser.parse_args()
    args.device = args.device or ("cuda" if args.real else "cpu")
    args.size = args.size or (2048 if args.real else 256)
    args.steps = args.steps or (5 if args.real else 20)
    if args.kind:
        print(json.dumps(run_kind(args)))
        return
    print(f"# train step: {'FLUX.1-dev architecture, bf16' if args.real else 'tiny model, fp32'}, "
          f"{args.size} px, batch 1, rank {args.rank}, gradient checkpointing {not args.no_checkpointing}")
    for kind in args.kinds.split(","):
        child = subprocess.run(
            [sys.executable, *sys.argv, "--kind", kind], capture_output=True, text=True, check=False
        )
        if child.returncode != 0:
            print(f"{kind}: failed\n{child.stderr[-2000:]}", file=sys.stderr)
            sys.exit(1)
        print(child.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
