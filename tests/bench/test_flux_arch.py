"""The benchmark's model of FLUX.1-dev: FLOPs per step counted on the real architecture, and the
random-weight pipeline built from the configs in code (fewer layers here, so a CPU runs it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


arch = _load("flux_arch")


def test_a_token_passes_through_6_45_billion_of_11_9_billion_parameters():
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel(**arch.FLUX_DEV_TRANSFORMER)
    total = sum(p.numel() for p in model.parameters())
    assert 11.85e9 < total < 11.95e9
    # the image path of every block, walked on the real module tree, equals the count from the config
    walked = 0
    for block in model.transformer_blocks:
        for module in (block.attn.to_q, block.attn.to_k, block.attn.to_v, block.attn.to_out[0], block.ff):
            walked += sum(p.numel() for p in module.parameters())
    for block in model.single_transformer_blocks:
        for module in (block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp, block.proj_out):
            walked += sum(p.numel() for p in module.parameters())
    assert walked == arch.per_token_params(arch.FLUX_DEV_TRANSFORMER)
    assert 6.40e9 < walked < 6.50e9
    # the text path of a double block is the same size (a token meets one of the two copies)
    block = model.transformer_blocks[0]
    text = sum(p.numel() for m in (block.attn.add_q_proj, block.attn.add_k_proj, block.attn.add_v_proj,
                                    block.attn.to_add_out, block.ff_context) for p in m.parameters())
    image = sum(p.numel() for m in (block.attn.to_q, block.attn.to_k, block.attn.to_v, block.attn.to_out[0],
                                     block.ff) for p in m.parameters())
    assert text == image


@pytest.mark.parametrize(("size", "tokens", "tflop", "attention_share"), [
    (1024, 4608, 74, 0.20), (2048, 16896, 418, 0.48), (4096, 66048, 3908, 0.78),
])
def test_flops_per_step_match_the_counted_figures(size, tokens, tflop, attention_share):
    f = arch.flops_per_step(arch.FLUX_DEV_TRANSFORMER, size, size, text_tokens=512)
    assert f["tokens"] == tokens
    assert f["total"] / 1e12 == pytest.approx(tflop, rel=0.01)
    assert f["attention"] / f["total"] == pytest.approx(attention_share, abs=0.01)
    # attention counted apart: 4 N^2 x width x 57 blocks
    assert f["attention"] == 4 * tokens**2 * 3072 * 57


@pytest.mark.slow
def test_random_real_architecture_pipeline_generates(tmp_path):
    """The same builder the GPU run uses, with 1 + 1 transformer blocks and 1 T5 layer: real widths,
    vocabularies and couplings, meta-device init, materialised with the cheap init."""
    from urae.generate import Generator
    from urae.presets import resolve_spec

    transformer = {**arch.FLUX_DEV_TRANSFORMER, "num_layers": 1, "num_single_layers": 1}
    t5 = {**arch.T5_XXL_ENCODER, "num_layers": 1}
    pipe = arch.build_real_pipeline("cpu", torch.bfloat16, seed=0, transformer_config=transformer, t5_config=t5)
    assert {p.device.type for p in pipe.components["transformer"].parameters()} == {"cpu"}
    assert pipe.text_encoder_2.config.d_model == 4096 and pipe.vae.config.latent_channels == 16
    generator = Generator(pipe, "real-architecture-test", text_encoder_offload="none")
    spec = resolve_spec("a lake", "1k", width=128, height=128, steps=1, preset_adapter=False)
    image = np.asarray(generator.generate(spec).images[0])
    assert image.shape == (128, 128, 3)
    assert image.std() > 0  # random weights, but a real image: not a constant, no NaN (-> 0)
    # the same seed gives the same transformer weights (the fp8 load of the device run relies on it)
    again = arch.build_real_transformer("cpu", torch.bfloat16, 0, transformer)
    first = dict(pipe.transformer.named_parameters())
    assert all(torch.equal(first[n], p) for n, p in again.named_parameters())


def test_lora_of_real_size():
    state = arch.real_lora_state_dict(2, seed=0)
    assert len(state) == 2 * (19 * 4 + 38 * 3)  # A and B on 190 matrices
    assert state["transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight"].shape == (2, 3072)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    assert 110e6 < nbytes * 48 / 2 < 115e6  # at rank 48: the published converted adapter's 112 MB
