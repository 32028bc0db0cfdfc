"""FLUX.1-dev's real architecture with random weights (no download), and its FLOPs per denoising step.

The configs below are FLUX.1-dev's published ones (transformer, VAE, CLIP-L text encoder, T5-XXL
encoder), written here because the benchmark machine has no hub access. Models are created on the
meta device (no memory, no init), materialised on the target device, and filled with a cheap
scaled-normal init there: the whole 17 B-parameter pipeline is ready in seconds on a GPU.
"""

from __future__ import annotations

import math
from typing import Any

import torch

FLUX_DEV_TRANSFORMER: dict[str, Any] = {
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
FLUX_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
CLIP_L_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
}
T5_XXL_ENCODER: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.0,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
    "tie_word_embeddings": False,
}
FLUX_DEV_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# diffusers' FLUX blocks: feed-forward width = 4 x the attention width (double and single blocks).
MLP_RATIO = 4
VAE_SCALE = 8


def per_token_params(config: dict[str, Any]) -> int:
    """Weights (with biases) one token passes through in one transformer forward.

    A double block runs image and text tokens through separate copies of q/k/v/out and the MLP: a
    token meets one copy. A single block: q/k/v, the MLP's input projection, and one output
    projection over [attention, MLP]. The AdaLN modulation runs once per image, not per token.
    """
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = MLP_RATIO * inner
    double = 4 * (inner * inner + inner) + (inner * mlp + mlp) + (mlp * inner + inner)
    single = 3 * (inner * inner + inner) + (inner * mlp + mlp) + ((inner + mlp) * inner + inner)
    return config["num_layers"] * double + config["num_single_layers"] * single


def flops_per_step(config: dict[str, Any], height: int, width: int, text_tokens: int = 512) -> dict[str, float]:
    """FLOPs of one transformer forward (one denoising step, no CFG) at ``height`` x ``width``.

    ``linear``: 2 x per-token weights x tokens, plus the embedders and output projection;
    ``attention``: QK^T and AV over all N = text + image tokens, 4 N^2 x width per block;
    ``modulation``: the per-image AdaLN projections. FLUX.1 at 2048 px: ~418 TFLOP, 4096 px: ~3,908.
    """
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    patch = config.get("patch_size", 1)
    image_tokens = (height // (VAE_SCALE * 2 * patch)) * (width // (VAE_SCALE * 2 * patch))
    n = text_tokens + image_tokens
    blocks = config["num_layers"] + config["num_single_layers"]
    out_channels = config.get("out_channels") or config["in_channels"]
    embed = (
        2 * image_tokens * config["in_channels"] * inner  # x_embedder
        + 2 * text_tokens * config["joint_attention_dim"] * inner  # context_embedder
        + 2 * image_tokens * inner * patch * patch * out_channels  # proj_out
    )
    linear = 2.0 * per_token_params(config) * n + embed
    attention = 4.0 * n * n * inner * blocks
    modulation = 2.0 * inner * inner * (config["num_layers"] * 12 + config["num_single_layers"] * 3 + 2)
    return {
        "tokens": float(n),
        "linear": linear,
        "attention": attention,
        "modulation": modulation,
        "total": linear + attention + modulation,
    }


def _fan_in(shape: torch.Size) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


@torch.no_grad()
def _materialise(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> None:
    """Replace meta parameters by device tensors: scaled normal weights (std 1/sqrt(fan_in), so the
    activations stay in range through 57 blocks), norm scales 1, biases 0."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            data = torch.empty(param.shape, device=device, dtype=dtype if param.is_floating_point() else param.dtype)
            if data.ndim >= 2:
                data.normal_(0.0, 1.0 / math.sqrt(_fan_in(data.shape)), generator=gen)
            elif name == "bias":
                data.zero_()
            else:
                data.fill_(1.0)
            sub._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
    # Buffers were created for real (on the CPU): move them along.
    module.to(device)
    module.eval()


def build_real_transformer(
    device: str | torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
    config: dict[str, Any] = FLUX_DEV_TRANSFORMER,
) -> Any:
    """FLUX.1-dev's transformer (11.9 B parameters) with random weights on ``device``; the same
    ``seed`` gives the same weights."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    device = torch.device(device)
    with init_empty_weights(include_buffers=False):
        transformer = FluxTransformer2DModel(**config)
    _materialise(transformer, device, dtype, torch.Generator(device=device).manual_seed(seed))
    return transformer


def build_real_pipeline(
    device: str | torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
    transformer_config: dict[str, Any] = FLUX_DEV_TRANSFORMER, t5_config: dict[str, Any] = T5_XXL_ENCODER,
) -> Any:
    """FLUX.1-dev (transformer, VAE, CLIP-L, T5-XXL, tokenizers) with random weights on ``device``.

    The tokenizers are the tiny model's in-memory ones: their ids are valid in the real vocabularies,
    which is all a timing run needs. Tests pass configs with fewer layers to run this on a CPU.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from urae.tiny import _clip_tokenizer, _t5_tokenizer

    device = torch.device(device)
    transformer = build_real_transformer(device, dtype, seed, transformer_config)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    with init_empty_weights(include_buffers=False):
        vae = AutoencoderKL(**FLUX_VAE)
        clip = CLIPTextModel(CLIPTextConfig(
            **CLIP_L_TEXT, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        ))
        t5 = T5EncoderModel(T5Config(**t5_config))
    for model in (vae, clip, t5):
        _materialise(model, device, dtype, gen)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def real_lora_state_dict(rank: int, seed: int, config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA of ``rank`` on to_q/to_k/to_v/to_out.0 of every block (URAE's targets),
    bf16, random: the size of the published adapters (rank 48: 112 MB)."""
    config = config or FLUX_DEV_TRANSFORMER
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    targets = [("transformer_blocks", i, t) for i in range(config["num_layers"]) for t in ("to_q", "to_k", "to_v", "to_out.0")]
    targets += [("single_transformer_blocks", i, t) for i in range(config["num_single_layers"]) for t in ("to_q", "to_k", "to_v")]
    for kind, i, target in targets:
        prefix = f"transformer.{kind}.{i}.attn.{target}"
        state[f"{prefix}.lora_A.weight"] = (torch.randn(rank, inner, generator=gen) / math.sqrt(inner)).to(torch.bfloat16)
        state[f"{prefix}.lora_B.weight"] = (torch.randn(inner, rank, generator=gen) * 1e-3).to(torch.bfloat16)
    return state
