"""URAE's high-resolution attention settings on stock diffusers FLUX: RoPE NTK scaling and
proportional attention.

diffusers has no option for either. NTK scaling multiplies the rotary base ``theta`` of
``transformer.pos_embed`` (10,000 -> 100,000 at factor 10, on every axis). Proportional attention
replaces the softmax scale 1/sqrt(d) by sqrt(log_base(N) / d), N = text + image tokens, base = 4608
(512 text + 64x64 image tokens: FLUX's 1024 px training length), so the attention entropy at N tokens
matches the trained length. At N == base it equals the stock scale, and the processor reproduces the
stock output exactly.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxAttnProcessor,
    FluxTransformer2DModel,
    _get_qkv_projections,
)

BASE_THETA = 10_000
BASE_SEQUENCE_LENGTH = 4608


def proportional_scale(num_tokens: int, head_dim: int, base: int = BASE_SEQUENCE_LENGTH) -> float:
    """Softmax scale sqrt(log_base(N) / head_dim).

    Written as sqrt(log_base N) / sqrt(head_dim) so that N == base gives exactly the stock
    1 / sqrt(head_dim) (bit-identical attention at the trained length).
    """
    return math.sqrt(math.log(num_tokens) / math.log(base)) / math.sqrt(head_dim)


class ProportionalAttnProcessor(FluxAttnProcessor):
    """FLUX attention with the softmax scale chosen from the joint sequence length.

    Same projections, norms and rotary embedding as the stock processor; only ``scale`` differs.
    """

    def __init__(self, base: int = BASE_SEQUENCE_LENGTH):
        super().__init__()
        self.base = base

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # Single-stream blocks receive text + image already concatenated; double-stream blocks were
        # concatenated above. Either way dim 1 is the joint length N.
        scale = proportional_scale(query.shape[1], attn.head_dim, self.base)
        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            scale=scale,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]],
                dim=1,
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def set_ntk_factor(transformer: FluxTransformer2DModel, factor: float) -> None:
    """Scale the rotary base of every axis: theta = 10,000 * factor."""
    transformer.pos_embed.theta = BASE_THETA * factor


def set_proportional_attention(transformer: FluxTransformer2DModel, enabled: bool) -> None:
    """Switch every attention module between the stock and the proportional processor.

    Only switches when needed, so repeated calls with the same value cost nothing.
    """
    for module in transformer.modules():
        if isinstance(module, FluxAttention):
            is_prop = isinstance(module.processor, ProportionalAttnProcessor)
            if enabled and not is_prop:
                module.set_processor(ProportionalAttnProcessor())
            elif not enabled and is_prop:
                module.set_processor(FluxAttnProcessor())


def apply_high_res_settings(
    transformer: FluxTransformer2DModel, ntk_factor: float = 1.0, proportional_attention: bool = False
) -> None:
    """Apply both URAE attention settings (used for generation and for 4K training)."""
    set_ntk_factor(transformer, ntk_factor)
    set_proportional_attention(transformer, proportional_attention)
