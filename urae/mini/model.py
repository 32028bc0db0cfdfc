"""``mini``: the FLUX.1 architecture at a size a CPU trains, with weights trained on the world.

Double and single stream blocks, RoPE over three axes, a guidance embedding like dev, an AutoencoderKL
with 4 levels (scale factor 8) and 2x2 packing, CLIP and T5 text encoders: the real classes of
diffusers and transformers, only narrower and shallower. The transformer and the VAE are trained
(see :mod:`urae.mini.train`) at :data:`BASE_RESOLUTION` on images of :mod:`urae.world`; the two text
encoders start from seeded random weights and learn with the transformer (FLUX.1's come pretrained;
random ones leave the transformer to untangle which word goes with which). Every component is stored,
so that a change in a library's initialisation never changes ``mini``.
The tokenizers are built in memory from the world's words plus single characters, so any prompt
tokenizes and the world's captions take one token a word.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTokenizer, T5TokenizerFast

from urae.tiny import small_text_encoders

MINI_MODEL_ID = "mini"
# The analogue of FLUX.1's 1024 px: the resolution mini is trained at; 2x and 4x are its "2K" and "4K".
BASE_RESOLUTION = 128
# T5 tokens: the world's captions take at most ~20; 64 is the smallest length the API offers.
MAX_SEQUENCE_LENGTH = 64
WEIGHTS_PATH = Path(__file__).with_name("weights") / "mini.safetensors"
# mini's URAE adapters, trained by the project's own training code (bench/mini_urae.py): the 2x LoRA
# and the 4x minor-component adapter, exported as one plain LoRA on the base weights.
BUILTIN_ADAPTER_FILES = {"urae-2k": "urae-2k.safetensors", "urae-4k": "urae-4k.safetensors"}
TEXT_SEED = 20250320

LATENT_CHANNELS = 8
TEXT_DIM = 64
POOLED_DIM = 64
TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4 * LATENT_CHANNELS,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 6,
    "joint_attention_dim": TEXT_DIM,
    "pooled_projection_dim": POOLED_DIM,
    "guidance_embeds": True,
    "axes_dims_rope": (8, 12, 12),
}
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (16, 32, 32, 32),
    "layers_per_block": 1,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 8,
    "sample_size": BASE_RESOLUTION,
    # Fitted to the trained encoder's latents by the training script (FLUX.1: 0.3611 and 0.1159).
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    # Convolutions only: nothing in the VAE depends on the image size.
    "mid_block_add_attention": False,
}
# FLUX.1-dev's scheduler, moved to mini's token counts: dev shifts from mu 0.5 at 256 image tokens
# (512 px) to 1.15 at 4096 (1024 px, its training size); mini from 16 (64 px) to 64 (128 px). Above
# the training size the dynamic shift extrapolates as dev's does; the 2x/4x presets use static 3.0.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": (BASE_RESOLUTION // 32) ** 2,
    "max_image_seq_len": (BASE_RESOLUTION // 16) ** 2,
}
# The image + text tokens of a base-resolution generation: proportional attention's reference length
# (FLUX.1's is 4608 = 512 text + 64 x 64 image tokens).
BASE_SEQUENCE_LENGTH = MAX_SEQUENCE_LENGTH + (BASE_RESOLUTION // 16) ** 2


def world_words() -> list[str]:
    """Every word of the world's captions (see urae.world.scene)."""
    from urae.world.scene import BACKGROUNDS, COLOURS, SHAPES

    words = ["a", "an", "one", "two", "three", "four", "and", "in", "row", "column", "on", "background"]
    words += list(COLOURS) + list(BACKGROUNDS) + list(SHAPES) + [s + "s" for s in SHAPES]
    return words


def _t5_tokenizer() -> T5TokenizerFast:
    # Unigram: a whole world word scores far above its spelling in characters.
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in world_words()]
    chars = string.ascii_lowercase + string.digits
    pieces += [("\u2581" + c, -6.0) for c in chars]
    pieces += [(c, -7.0) for c in chars + string.punctuation]
    pieces += [("\u2581", -8.0)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_tokenizer() -> CLIPTokenizer:
    # Byte-level BPE: every printable character is a token, and merges spell out each world word.
    # Words share pairs ("tr" in "striped" and "triangle"), so merges are added until every word is
    # one token: each new merge joins the first two pieces a word still splits into.
    chars = [c for c in string.printable if not c.isspace()]
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    words = world_words()
    for _ in range(sum(len(w) for w in words)):
        split = [(w, _bpe(w, merges)) for w in words]
        unfinished = [(w, pieces) for w, pieces in split if len(pieces) > 1]
        if not unfinished:
            break
        _, pieces = unfinished[0]
        merges.append((pieces[0], pieces[1]))
        vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """The pieces BPE splits ``word`` into with ``merges`` (lowest rank first, as CLIP applies them)."""
    ranks = {pair: i for i, pair in enumerate(merges)}
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:], strict=False))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def build_mini_pipeline(weights: str | Path | None = WEIGHTS_PATH, dtype: torch.dtype = torch.float32) -> FluxPipeline:
    """The mini pipeline in eval mode, its weights read from ``weights`` (None: untrained, seeded)."""
    devices: list[int] = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(TEXT_SEED)
        clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
        clip, t5 = small_text_encoders(clip_tok, t5_tok, pooled_dim=POOLED_DIM, text_dim=TEXT_DIM, hidden=128,
                                       t5_head_dim=16)
        transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
        vae_config = dict(VAE_CONFIG)
        if weights is not None:
            vae_config.update(_stored_vae_scaling(Path(weights)))
        vae = AutoencoderKL(**vae_config)
    if weights is not None:
        load_weights(Path(weights), {"transformer": transformer, "vae": vae, "text_encoder": clip, "text_encoder_2": t5})
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    for module in (clip, t5, transformer, vae):
        module.eval()
        module.requires_grad_(False)
    # Proportional attention's reference length is mini's own base length, not FLUX.1's 4608: its
    # processors are installed now (in stock mode, the stock computation) with that base.
    from urae.attention import proportional_processors

    for processor in proportional_processors(transformer):
        processor.base = BASE_SEQUENCE_LENGTH
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return pipe


def builtin_adapter_path(name: str) -> Path:
    """The file of one of mini's built-in adapters (``urae-2k``, ``urae-4k``)."""
    from urae.errors import AdapterNotFoundError

    if name not in BUILTIN_ADAPTER_FILES:
        raise AdapterNotFoundError(f"{name}: mini's built-in adapters are {', '.join(BUILTIN_ADAPTER_FILES)}")
    path = WEIGHTS_PATH.with_name(BUILTIN_ADAPTER_FILES[name])
    if not path.is_file():
        raise AdapterNotFoundError(f"{path}: mini's {name} adapter is missing from the package")
    return path


def _stored_vae_scaling(path: Path) -> dict[str, float]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "vae_scaling" not in metadata:
        return {}
    values = json.loads(metadata["vae_scaling"])
    return {"scaling_factor": float(values["scaling_factor"]), "shift_factor": float(values["shift_factor"])}


def load_weights(path: Path, modules: dict[str, torch.nn.Module]) -> None:
    """Load each module's tensors (keys ``{component}.{name}``); every tensor must be present."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for component, module in modules.items():
        prefix = component + "."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        own = module.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"{path}: {component} lacks {len(missing)} tensors, e.g. {missing[0]}")
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items() if k in own}, strict=True)


def save_weights(
    path: Path, modules: dict[str, torch.nn.Module], vae_scaling: dict[str, float], metadata: dict[str, str]
) -> Path:
    """Write every module's tensors in float16 (one file), with the VAE scaling in the metadata."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for component, module in modules.items():
        for name, value in module.state_dict().items():
            stored = value.detach().to("cpu")
            tensors[f"{component}.{name}"] = (stored.half() if stored.is_floating_point() else stored).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={**metadata, "vae_scaling": json.dumps(vae_scaling)})
    tmp.replace(path)
    return path
