"""Generation timing on the REAL FLUX.1-dev architecture with random bf16 weights (no download).

Builds the 19 double + 38 single block transformer (width 3072) and the real VAE config directly on
the device; the text encoders are replaced by random prompt embeddings of the right shapes (512 T5
tokens x 4096, pooled 768), which is what the transformer sees. For each size it runs the URAE
settings of the matching preset (NTK 10, proportional attention and static shift 3.0 above 1K,
tiled decode at 4K) and prints seconds per step, the denoise and decode times, an estimate of 28
steps end to end, and peak GPU memory.

    python bench/gpu_generate.py                      # GPU: 1024, 2048, 4096 px, 4 timed steps each
    python bench/gpu_generate.py --sizes 2048 --steps 8
    python bench/gpu_generate.py --tiny               # CPU smoke run on the tiny model (keeps this script alive)
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from urae.attention import apply_high_res_settings
from urae.generate import make_scheduler
from urae.presets import PRESETS
from urae.tiny import build_tiny_pipeline
from urae.vae_decode import decode_latents

FLUX_DEV_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def build_real_pipeline(device: str) -> FluxPipeline:
    """FLUX.1-dev's transformer and VAE with random weights, created on ``device`` in bf16."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(guidance_embeds=True)
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=16,
                norm_num_groups=32,
                sample_size=1024,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                use_quant_conv=False,
                use_post_quant_conv=False,
            )
    finally:
        torch.set_default_dtype(previous)
    transformer.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def flops_per_step(size: int, text_tokens: int, params: float, width: int, blocks: int) -> float:
    """URAE.md's estimate: linear layers 2 * params * tokens, attention 4 * N^2 * width * blocks
    (3072 and 57 for FLUX.1)."""
    n = text_tokens + (size // 16) ** 2
    return 2 * params * n + 4 * n * n * width * blocks


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_size(
    pipe: FluxPipeline, size: int, steps: int, device: str, text_dim: int, pooled_dim: int
) -> dict:
    preset = PRESETS[{1024: "1k", 2048: "2k", 4096: "4k"}.get(size, "2k")]
    apply_high_res_settings(pipe.transformer, preset.ntk_factor, preset.proportional_attention)
    base_config = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER).config
    pipe.scheduler = make_scheduler(base_config, preset.shift)
    dtype = pipe.transformer.dtype
    gen = torch.Generator().manual_seed(0)
    prompt_embeds = torch.randn(1, 512, text_dim, generator=gen).to(device, dtype)
    pooled = torch.randn(1, pooled_dim, generator=gen).to(device, dtype)
    stamps: list[float] = []

    def on_step(_pipe, i, _t, kwargs):
        sync(device)
        stamps.append(time.perf_counter())
        return kwargs

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    packed = pipe(
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        callback_on_step_end=on_step,
    ).images
    sync(device)
    denoise = time.perf_counter() - start
    # The first step includes one-off work (allocations, kernel selection): time the rest.
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else denoise
    latents = pipe._unpack_latents(packed, size, size, pipe.vae_scale_factor)
    start = time.perf_counter()
    image = decode_latents(pipe.vae, latents, preset.vae_decode)
    sync(device)
    decode = time.perf_counter() - start
    assert image.shape[-2:] == (size, size)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return {
        "size": size,
        "per_step": per_step,
        "denoise": denoise,
        "decode": decode,
        "decode_mode": preset.vae_decode,
        "est_28": 28 * per_step + decode,
        "peak_gib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny model")
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    if args.tiny:
        device = args.device or "cpu"
        tiny = build_tiny_pipeline("tiny").to(device)
        # The same pipeline shape as the real run: no text encoders, random prompt embeddings.
        pipe = FluxPipeline(
            scheduler=tiny.scheduler,
            vae=tiny.vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=tiny.transformer,
        )
        sizes = args.sizes or [256, 512]
    else:
        device = args.device or "cuda"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny on a CPU")
        start = time.perf_counter()
        pipe = build_real_pipeline(device)
        print(f"built FLUX.1-dev architecture (random bf16) in {time.perf_counter() - start:.1f} s")
        sizes = args.sizes or [1024, 2048, 4096]
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.transformer.config
    params = sum(p.numel() for p in pipe.transformer.parameters())
    text_dim, pooled_dim = cfg.joint_attention_dim, cfg.pooled_projection_dim
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(f"device {name}, transformer {params / 1e9:.3f} B parameters, {args.steps} timed steps per size")
    bench_size(pipe, sizes[0], 2, device, text_dim, pooled_dim)  # warm-up
    header = f"{'size':>6} {'s/step':>8} {'TFLOP/s':>8} {'denoise s':>10} {'decode s':>9} {'decode':>7} {'28 steps est s':>15} {'peak GiB':>9}"
    print(header)
    for size in sizes:
        row = bench_size(pipe, size, args.steps, device, text_dim, pooled_dim)
        width = cfg.num_attention_heads * cfg.attention_head_dim
        blocks = cfg.num_layers + cfg.num_single_layers
        tflops = flops_per_step(size, 512, params, width, blocks) / row["per_step"] / 1e12
        print(
            f"{size:>6} {row['per_step']:>8.3f} {tflops:>8.1f} {row['denoise']:>10.2f} {row['decode']:>9.2f} "
            f"{row['decode_mode']:>7} {row['est_28']:>15.1f} {row['peak_gib']:>9.1f}"
        )


if __name__ == "__main__":
    main()
