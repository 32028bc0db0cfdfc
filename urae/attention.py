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

    Same projections, norms and rotary embedding as the stock processor; only the logit scale
    differs. Three modes, switched in place (never by replacing the processor, which would drop the
    attention backend and any parallel config set on it):

    - ``stock``: the stock scale 1/sqrt(d);
    - ``length``: the scale of this call's sequence length (eager use, e.g. training);
    - ``tensor``: the query is multiplied by ``logit_ratio``, a 0-dim tensor on the model's device that
      the caller fills with sqrt(log_base N) for the request's N. A compiled graph reads it as an input,
      so it is not specialised per sequence length, and under context parallelism N is the global
      length the caller knows, not the local shard's.
    """

    MODES = ("stock", "length", "tensor")

    def __init__(self, base: int = BASE_SEQUENCE_LENGTH, mode: str = "length"):
        super().__init__()
        self.base = base
        self.mode = mode
        self.logit_ratio: torch.Tensor | None = None

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

        scale: float | None = None
        if self.mode == "tensor" and self.logit_ratio is not None:
            # Scaling q by r scales every logit by r: the same as passing scale=r/sqrt(d).
            query = query * self.logit_ratio.to(query.dtype)
        elif self.mode == "length":
            # Single-stream blocks receive text + image already concatenated; double-stream blocks
            # were concatenated above. Either way dim 1 is the joint length N, or under context
            # parallelism this rank's equal share of it.
            num_tokens = query.shape[1] * context_parallel_shards(self._parallel_config)
            scale = proportional_scale(num_tokens, attn.head_dim, self.base)
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


def context_parallel_shards(parallel_config: object | None) -> int:
    """How many equal parts of the sequence the ranks hold (1 without context parallelism)."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    return 1 if cp is None else int(cp.ring_degree) * int(cp.ulysses_degree)


def set_ntk_factor(transformer: FluxTransformer2DModel, factor: float) -> None:
    """Scale the rotary base of every axis: theta = 10,000 * factor."""
    transformer.pos_embed.theta = BASE_THETA * factor


def logit_ratio(num_tokens: int, base: int = BASE_SEQUENCE_LENGTH) -> float:
    """sqrt(log_base N): the proportional scale divided by the stock one (exactly 1.0 at N == base)."""
    return math.sqrt(math.log(num_tokens) / math.log(base))


def proportional_processors(transformer: FluxTransformer2DModel) -> list[ProportionalAttnProcessor]:
    """The proportional processor of every attention module, installed once where missing.

    A stock processor is converted by copying its attention backend and parallel config, so nothing
    chosen earlier is lost; afterwards the processors are only ever switched in place.
    """
    processors = []
    for module in transformer.modules():
        if not isinstance(module, FluxAttention):
            continue
        processor = module.processor
        if not isinstance(processor, ProportionalAttnProcessor):
            replacement = ProportionalAttnProcessor(mode="stock")
            replacement._attention_backend = getattr(processor, "_attention_backend", None)
            replacement._parallel_config = getattr(processor, "_parallel_config", None)
            module.set_processor(replacement)
            processor = replacement
        processors.append(processor)
    return processors


def set_proportional_attention(
    transformer: FluxTransformer2DModel, enabled: bool, num_tokens: int | None = None
) -> None:
    """Switch proportional attention on the existing processors.

    Without ``num_tokens`` the scale comes from each call's sequence length (eager use). With it, every
    processor reads one shared 0-dim tensor holding sqrt(log_base N) (1.0 when disabled): switching
    presets, sizes or on/off only writes that value, so a compiled transformer never recompiles.
    """
    processors = proportional_processors(transformer)
    if num_tokens is None:
        for processor in processors:
            processor.mode = "length" if enabled else "stock"
        return
    ratio = processors[0].logit_ratio if processors else None
    if ratio is None:
        device = next(transformer.parameters()).device
        ratio = torch.ones((), dtype=torch.float32, device=device)
    ratio.fill_(logit_ratio(num_tokens, processors[0].base) if enabled else 1.0)
    for processor in processors:
        processor.mode = "tensor"
        processor.logit_ratio = ratio


def apply_high_res_settings(
    transformer: FluxTransformer2DModel,
    ntk_factor: float = 1.0,
    proportional_attention: bool = False,
    num_tokens: int | None = None,
) -> None:
    """Apply both URAE attention settings (used for generation and for 4K training).

    ``num_tokens`` (text + image tokens of the request) selects the graph-stable tensor mode.
    """
    set_ntk_factor(transformer, ntk_factor)
    set_proportional_attention(transformer, proportional_attention, num_tokens)
