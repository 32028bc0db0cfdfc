"""The rectified-flow training objective of FLUX, on cached latents.

x_t = (1 - s) x0 + s eps, the transformer predicts the velocity eps - x0, plain MSE. URAE samples
s ~ U(0, 1) with no resolution shift; logit-normal sampling is an option.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from torch import nn


def sample_sigmas(
    batch: int, sampling: str, generator: torch.Generator, logit_mean: float = 0.0, logit_std: float = 1.0
) -> torch.Tensor:
    """Noise levels in (0, 1) on the CPU: uniform, or sigmoid of a normal (logit-normal)."""
    if sampling == "uniform":
        return torch.rand(batch, generator=generator)
    return torch.sigmoid(torch.randn(batch, generator=generator) * logit_std + logit_mean)


def flow_matching_loss(
    transformer: nn.Module,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    guidance: float | None,
) -> torch.Tensor:
    """MSE between the predicted and the true velocity at noise level ``sigmas``.

    ``latents`` and ``noise``: (B, C, H, W), already shifted and scaled for the transformer;
    ``guidance`` None for models without a guidance embedding (schnell).
    """
    b, c, h, w = latents.shape
    s = sigmas.to(latents.device, latents.dtype).view(b, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    target = FluxPipeline._pack_latents(noise - latents, b, c, h, w)
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=latents.device, dtype=latents.dtype)
    guidance_vec = None
    if guidance is not None:
        guidance_vec = torch.full((b,), guidance, device=latents.device, dtype=latents.dtype)
    # FLUX's transformer takes the timestep as sigma in [0, 1] (it multiplies by 1000 itself).
    prediction = transformer(
        hidden_states=packed,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled_prompt_embeds,
        timestep=sigmas.to(latents.device, latents.dtype),
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=guidance_vec,
        return_dict=False,
    )[0]
    return F.mse_loss(prediction.float(), target.float())
