from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor, FluxPosEmbed

from urae.attention import (
    BASE_SEQUENCE_LENGTH,
    ProportionalAttnProcessor,
    apply_high_res_settings,
    proportional_scale,
)
from urae.tiny import build_tiny_pipeline


def _inputs(transformer, text_tokens: int, image_tokens: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    side = int(math.isqrt(image_tokens))
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return {
        "hidden_states": torch.randn(1, image_tokens, cfg.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=gen),
        "timestep": torch.tensor([0.7]),
        "guidance": torch.tensor([3.5]),
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(text_tokens, 3),
        "return_dict": False,
    }


@pytest.fixture(scope="module")
def transformer():
    return build_tiny_pipeline("tiny").transformer


def test_scale_formula():
    assert proportional_scale(4608, 128) == pytest.approx(1 / math.sqrt(128), abs=0)
    # 2048 px: 512 text + 128*128 image tokens; 4096 px: 512 + 256*256 (URAE.md: ~1.074x, ~1.147x logits)
    assert proportional_scale(512 + 128 * 128, 128) * math.sqrt(128) == pytest.approx(1.074, abs=0.002)
    assert proportional_scale(512 + 256 * 256, 128) * math.sqrt(128) == pytest.approx(1.147, abs=0.002)


def test_base_length_and_ntk_1_equal_stock_exactly(transformer):
    # N = 512 text + 64x64 image tokens = 4608, the base length: the output must be bit-identical.
    inputs = _inputs(transformer, 512, 64 * 64)
    with torch.no_grad():
        apply_high_res_settings(transformer, ntk_factor=1.0, proportional_attention=False)
        stock = transformer(**inputs)[0]
        apply_high_res_settings(transformer, ntk_factor=1.0, proportional_attention=True)
        assert all(
            isinstance(m.processor, ProportionalAttnProcessor)
            for m in transformer.modules()
            if isinstance(m, FluxAttention)
        )
        ours = transformer(**inputs)[0]
    apply_high_res_settings(transformer, 1.0, False)
    assert 512 + 64 * 64 == BASE_SEQUENCE_LENGTH
    # Same process and inputs; at the base length the scale is exactly the stock 1/sqrt(head_dim)
    # (log_N(N) == 1.0), so the same kernel computes the same sums: bitwise by construction.
    assert torch.equal(stock, ours)


@pytest.mark.parametrize("double_stream", [True, False])
def test_processor_scales_logits_by_the_formula(transformer, double_stream):
    # Multiplying the query norm's weight by c multiplies every logit by c, so the stock processor
    # with c = scale_prop / scale_stock must reproduce the proportional processor.
    block = transformer.transformer_blocks[0] if double_stream else transformer.single_transformer_blocks[0]
    attn = block.attn
    gen = torch.Generator().manual_seed(1)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    text, image = 24, 300
    hidden = torch.randn(1, image if double_stream else text + image, dim, generator=gen)
    context = torch.randn(1, text, dim, generator=gen) if double_stream else None
    n = text + image
    factor = proportional_scale(n, attn.head_dim) * math.sqrt(attn.head_dim)
    assert factor < 1  # N below the base length: flatter attention
    with torch.no_grad():
        prop = ProportionalAttnProcessor()(attn, hidden, context)
        attn.norm_q.weight.mul_(factor)
        if double_stream:
            attn.norm_added_q.weight.mul_(factor)
        try:
            stock = FluxAttnProcessor()(attn, hidden, context)
        finally:
            attn.norm_q.weight.div_(factor)
            if double_stream:
                attn.norm_added_q.weight.div_(factor)
        plain = FluxAttnProcessor()(attn, hidden, context)
    prop_t = prop[0] if double_stream else prop
    stock_t = stock[0] if double_stream else stock
    plain_t = plain[0] if double_stream else plain
    torch.testing.assert_close(prop_t, stock_t, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(prop_t, plain_t, atol=1e-4)


def test_ntk_factor_scales_rope_theta(transformer):
    ids = torch.stack([torch.zeros(50), torch.arange(50.0), torch.arange(50.0)], dim=1)
    apply_high_res_settings(transformer, ntk_factor=10.0)
    try:
        assert transformer.pos_embed.theta == 100_000
        ours = transformer.pos_embed(ids)
        reference = FluxPosEmbed(theta=100_000, axes_dim=list(transformer.config.axes_dims_rope))(ids)
    finally:
        apply_high_res_settings(transformer, ntk_factor=1.0)
    assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])
    stock = transformer.pos_embed(ids)
    assert not torch.allclose(stock[0], ours[0])
