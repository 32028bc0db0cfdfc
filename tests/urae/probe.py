"""A fixed input for comparing tiny transformers: same weights and adapters give the same output."""

from __future__ import annotations

from typing import Any

import torch


def transformer_output(transformer: Any) -> torch.Tensor:
    """The transformer's prediction for fixed random latents and text (one 16-token image)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 16, 16, generator=g)
    text = torch.randn(1, 8, 32, generator=g)
    pooled = torch.randn(1, 32, generator=g)
    img_ids = torch.stack([torch.zeros(16), torch.arange(16) // 4, torch.arange(16) % 4], dim=1).float()
    guidance = torch.tensor([3.5]) if transformer.config.guidance_embeds else None
    with torch.no_grad():
        return transformer(
            hidden_states=hidden,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=torch.tensor([0.5]),
            img_ids=img_ids,
            txt_ids=torch.zeros(8, 3),
            guidance=guidance,
            return_dict=False,
        )[0]
