"""Train ``mini`` from scratch: ``python -m urae.mini.train --out DIR`` (seeded, resumable).

Four stages, each checkpointed in ``DIR`` so an interrupted run continues where it stopped:

1. the VAE (AutoencoderKL, L1 + MSE with a small KL term) on crops of world images at the base
   resolution; its latent scale and shift are then fitted like FLUX.1's (0.3611 / 0.1159);
2. a pool of world scenes encoded once (posterior mean and std; prompt embeddings, used only when
   the text encoders stay frozen);
3. the transformer and the two text encoders (from their seeded random weights; FLUX.1's come
   pretrained, random ones scramble which word goes with which) with FLUX's rectified-flow objective
   (urae.train.flow_matching): x_t = (1-s) x0 + s eps, target eps - x0, s logit-normal shifted as at
   FLUX's training size (mu 1.15), the guidance embedding fed a random value in [1, 5] (mini is not
   guidance-distilled: the input carries nothing);
4. the decoder alone on the fixed encoder's latents (sharper edges and truer colours; the latent space,
   and so the transformer, unchanged).

``--install`` copies the result to the package's weights (urae/mini/weights/mini.safetensors).
``--quick`` runs every stage for a few steps (a test runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from urae.mini.model import (
    BASE_RESOLUTION,
    MAX_SEQUENCE_LENGTH,
    WEIGHTS_PATH,
    build_mini_pipeline,
    save_weights,
)
from urae.world.render import render
from urae.world.scene import sample_scene

WEIGHTS_NAME = "mini.safetensors"
FORMAT = "urae-mini-1"
# mu of FLUX's timestep shift at its training size (shift e^1.15 = 3.16); mini trains at its own.
TRAIN_MU = 1.15


@dataclass
class MiniTrainConfig:
    seed: int = 0
    vae_steps: int = 700
    vae_batch: int = 8
    vae_crop: int = 64
    vae_lr: float = 1.5e-3
    # Stage 4: the decoder alone, the encoder (and so the latent space the transformer learned) fixed.
    decoder_steps: int = 1500
    decoder_batch: int = 8
    decoder_lr: float = 5e-4
    pool_size: int = 8192
    steps: int = 8000
    batch: int = 16
    lr: float = 6e-4
    warmup: int = 100
    min_lr_ratio: float = 0.1
    checkpoint_every: int = 50
    threads: int = 2
    # bf16 autocast only where the CPU computes bf16 natively (AVX512-BF16, AMX): elsewhere torch
    # emulates it, about 30x slower than float32 for this model (0.4 against 12 s a step on AVX2).
    bf16: bool = False
    # The two text encoders learn with the transformer (FLUX.1's come pretrained; random ones scramble
    # which word goes with which): the pool's cached prompt embeddings are then not used.
    train_text_encoders: bool = True


# The settings each stage depends on: a resumed run may change a later stage's, never a finished one's.
STAGE_FIELDS = {
    "vae": ("seed", "vae_steps", "vae_batch", "vae_crop", "vae_lr", "min_lr_ratio"),
    "pool": ("seed", "pool_size"),
    "transformer": ("seed", "steps", "batch", "lr", "warmup", "min_lr_ratio", "bf16", "train_text_encoders"),
    "decoder": ("seed", "decoder_steps", "decoder_batch", "vae_crop", "decoder_lr", "min_lr_ratio"),
}
STAGE_FILES = {"vae": ("vae.pt", "vae-done.pt"), "pool": ("pool.pt",),
               "transformer": ("transformer.pt", "transformer-done.pt"), "decoder": ("decoder.pt", "decoder-done.pt")}
QUICK: dict[str, Any] = {"vae_steps": 2, "vae_batch": 2, "pool_size": 8, "steps": 2, "batch": 4, "warmup": 1,
                         "decoder_steps": 2, "decoder_batch": 2, "checkpoint_every": 1}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _scene_seed(seed: int, stage: int, index: int) -> int:
    return (seed * 1_000_003 + stage) * 10_000_019 + index


class _Progress:
    """A training stage's checkpoint (``{key, "optimizer", "step"}`` in ``ckpt``), resumed where it stopped,
    and its log lines: every ``log_every`` steps and at the last, with the mean time a step."""

    def __init__(self, key: str, ckpt: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 total: int, log_every: int, checkpoint_every: int) -> None:
        self.key, self.ckpt, self.module, self.optimizer = key, ckpt, module, optimizer
        self.total, self.log_every, self.checkpoint_every = total, log_every, checkpoint_every
        self.start = 0
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=True)
            module.load_state_dict(state[key])
            optimizer.load_state_dict(state["optimizer"])
            self.start = int(state["step"])
            _log(f"{key}: resuming at step {self.start}")
        self.started = time.monotonic()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step_done(self, done: int, loss: float) -> None:
        """After step ``done`` (counted from 1): log, and checkpoint unless it was the last."""
        if done % self.log_every == 0 or done == self.total:
            rate = (time.monotonic() - self.started) / (done - self.start)
            _log(f"{self.key} step {done}/{self.total} loss {loss:.4f} ({rate:.2f} s/step)")
        if done % self.checkpoint_every == 0 and done < self.total:
            _save(self.ckpt, {self.key: self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "step": done})


def _pixels(images: list[Any]) -> torch.Tensor:
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def train_vae(pipe: Any, config: MiniTrainConfig, out: Path) -> dict[str, float]:
    """Stage 1: the VAE; returns its fitted latent scaling."""
    vae = pipe.vae
    done_path = out / "vae-done.pt"
    if done_path.exists():
        state = torch.load(done_path, weights_only=True)
        vae.load_state_dict(state["vae"])
        return dict(state["scaling"])
    ckpt = out / "vae.pt"
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    progress = _Progress("vae", ckpt, vae, optimizer, config.vae_steps, 25, config.checkpoint_every)
    vae.train().requires_grad_(True)
    for step in range(progress.start, config.vae_steps):
        rng = random.Random(_scene_seed(config.seed, 1, step))
        crops = []
        for i in range(config.vae_batch):
            image = render(sample_scene(_scene_seed(config.seed, 11, step * config.vae_batch + i)), BASE_RESOLUTION)
            x0 = rng.randrange(0, BASE_RESOLUTION - config.vae_crop + 1)
            y0 = rng.randrange(0, BASE_RESOLUTION - config.vae_crop + 1)
            crops.append(image.crop((x0, y0, x0 + config.vae_crop, y0 + config.vae_crop)))
        pixels = _pixels(crops)
        progress.set_lr(config.vae_lr * _lr_factor(step, config.vae_steps, 20, config.min_lr_ratio))
        posterior = vae.encode(pixels).latent_dist
        # The latent sample from the step's own generator: the global RNG would make reruns differ.
        sample = posterior.sample(generator=torch.Generator().manual_seed(_scene_seed(config.seed, 14, step)))
        reconstruction = vae.decode(sample).sample
        loss = F.l1_loss(reconstruction, pixels) + F.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        progress.step_done(step + 1, loss.item())
    vae.eval().requires_grad_(False)
    scaling = _fit_scaling(vae, config)
    _save(done_path, {"vae": vae.state_dict(), "scaling": scaling})
    ckpt.unlink(missing_ok=True)
    _log(f"vae done: scaling {scaling}")
    return scaling


@torch.no_grad()
def _fit_scaling(vae: Any, config: MiniTrainConfig) -> dict[str, float]:
    """FLUX's convention: latents enter the transformer as (z - shift) * scale with unit spread."""
    images = [render(sample_scene(_scene_seed(config.seed, 12, i)), BASE_RESOLUTION) for i in range(32)]
    latents = vae.encode(_pixels(images)).latent_dist.mean
    shift = float(latents.mean())
    return {"shift_factor": shift, "scaling_factor": float(1.0 / (latents - shift).std())}


def refine_decoder(pipe: Any, config: MiniTrainConfig, out: Path) -> None:
    """Stage 4: the decoder trained further on the fixed encoder's latents (L1 + MSE on crops), as
    Stable Diffusion's ft-MSE decoder was: sharper edges and truer colours, same latent space, so
    the transformer stays valid."""
    vae = pipe.vae
    done_path = out / "decoder-done.pt"
    if done_path.exists():
        vae.decoder.load_state_dict(torch.load(done_path, weights_only=True)["decoder"])
        return
    decoder = vae.decoder
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=config.decoder_lr, weight_decay=0.0)
    progress = _Progress("decoder", out / "decoder.pt", decoder, optimizer, config.decoder_steps, 25,
                         config.checkpoint_every)
    vae.eval().requires_grad_(False)
    decoder.train().requires_grad_(True)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent (8, as FLUX.1's VAE)
    crop = config.vae_crop // factor
    for step in range(progress.start, config.decoder_steps):
        rng = random.Random(_scene_seed(config.seed, 5, step))
        images = [render(sample_scene(_scene_seed(config.seed, 13, step * config.decoder_batch + i)), BASE_RESOLUTION)
                  for i in range(config.decoder_batch)]
        pixels = _pixels(images)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(_scene_seed(config.seed, 6, step))
            latents = vae.encode(pixels).latent_dist.sample(generator=generator)
        size = latents.shape[-1]
        crops, targets = [], []
        for i in range(config.decoder_batch):
            y0, x0 = rng.randrange(0, size - crop + 1), rng.randrange(0, size - crop + 1)
            crops.append(latents[i, :, y0 : y0 + crop, x0 : x0 + crop])
            targets.append(pixels[i, :, y0 * factor : (y0 + crop) * factor, x0 * factor : (x0 + crop) * factor])
        progress.set_lr(config.decoder_lr * _lr_factor(step, config.decoder_steps, 20, config.min_lr_ratio))
        reconstruction = vae.decode(torch.stack(crops)).sample
        target = torch.stack(targets)
        loss = F.l1_loss(reconstruction, target) + F.mse_loss(reconstruction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        optimizer.step()
        progress.step_done(step + 1, loss.item())
    decoder.eval().requires_grad_(False)
    _save(done_path, {"decoder": decoder.state_dict()})
    progress.ckpt.unlink(missing_ok=True)


@torch.no_grad()
def encode_pool(pipe: Any, config: MiniTrainConfig, out: Path) -> dict[str, torch.Tensor]:
    """Stage 2: the training scenes, encoded once."""
    path = out / "pool.pt"
    if path.exists():
        return dict(torch.load(path, weights_only=True))
    from urae.data.cache import encode_prompt

    chunk = 64
    texts = pool_captions(config)
    number = {caption: i for i, caption in enumerate(texts)}
    means, stds, caption_ids = [], [], []
    started = time.monotonic()
    for first in range(0, config.pool_size, chunk):
        scenes = [sample_scene(_scene_seed(config.seed, 2, i)) for i in range(first, min(first + chunk, config.pool_size))]
        posterior = pipe.vae.encode(_pixels([render(s, BASE_RESOLUTION) for s in scenes])).latent_dist
        means.append(posterior.mean.half())
        stds.append(posterior.std.half())
        caption_ids += [number[scene.caption] for scene in scenes]
        _log(f"pool {min(first + chunk, config.pool_size)}/{config.pool_size} ({time.monotonic() - started:.0f} s)")
    embeds, pooled = zip(*(encode_prompt(pipe, caption, MAX_SEQUENCE_LENGTH) for caption in texts), strict=True)
    pool = {
        "latent_mean": torch.cat(means),
        "latent_std": torch.cat(stds),
        "caption": torch.tensor(caption_ids),
        "prompt_embeds": torch.stack(embeds),
        "pooled_prompt_embeds": torch.stack(pooled),
    }
    _save(path, pool)
    return pool


def _lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def pool_captions(config: MiniTrainConfig) -> list[str]:
    """The pool's distinct captions, numbered as :func:`encode_pool` numbers them (first appearance)."""
    captions: dict[str, None] = {}
    for i in range(config.pool_size):
        captions.setdefault(sample_scene(_scene_seed(config.seed, 2, i)).caption)
    return list(captions)


class TextEncoding:
    """Prompt embeddings with gradients, computed as FluxPipeline.encode_prompt computes them (T5's last
    hidden states at ``MAX_SEQUENCE_LENGTH`` tokens, CLIP's pooled output at 77), from token ids made once."""

    def __init__(self, pipe: Any, captions: list[str]) -> None:
        self.pipe = pipe
        self.t5_ids = pipe.tokenizer_2(captions, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                                       return_tensors="pt").input_ids
        self.clip_ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer_max_length,
                                       truncation=True, return_tensors="pt").input_ids

    def __call__(self, caption_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.pipe.text_encoder_2(self.t5_ids[caption_ids], output_hidden_states=False)[0]
        pooled = self.pipe.text_encoder(self.clip_ids[caption_ids], output_hidden_states=False).pooler_output
        return embeds, pooled


def _trained_modules(pipe: Any, config: MiniTrainConfig) -> dict[str, torch.nn.Module]:
    modules = {"transformer": pipe.transformer}
    if config.train_text_encoders:
        modules |= {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    return modules


def train_transformer(pipe: Any, pool: dict[str, torch.Tensor], config: MiniTrainConfig, out: Path) -> None:
    """Stage 3: the transformer (and the text encoders), with FLUX's rectified-flow loss on the pool's latents."""
    from urae.train.flow_matching import flow_matching_loss

    trained = torch.nn.ModuleDict(_trained_modules(pipe, config))
    done_path = out / "transformer-done.pt"
    if done_path.exists():
        trained.load_state_dict(torch.load(done_path, weights_only=True)["transformer"])
        return
    shift = float(pipe.vae.config.shift_factor)
    scale = float(pipe.vae.config.scaling_factor)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=config.lr, weight_decay=0.0)
    ckpt = out / "transformer.pt"
    progress = _Progress("transformer", ckpt, trained, optimizer, config.steps, 10, config.checkpoint_every)
    trained.train().requires_grad_(True)
    text = None
    if config.train_text_encoders:
        texts = pool_captions(config)
        if len(texts) != len(pool["prompt_embeds"]):
            raise ValueError(f"the pool holds {len(pool['prompt_embeds'])} captions, its scenes {len(texts)}")
        text = TextEncoding(pipe, texts)
    size = int(pool["latent_mean"].shape[0])
    per_epoch = max(1, size // config.batch)
    losses: list[float] = []
    for step in range(progress.start, config.steps):
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(_scene_seed(config.seed, 3, epoch)))
        index = order[position * config.batch : (position + 1) * config.batch]
        generator = torch.Generator().manual_seed(_scene_seed(config.seed, 4, step))
        mean = pool["latent_mean"][index].float()
        std = pool["latent_std"][index].float()
        latents = (mean + std * torch.randn(mean.shape, generator=generator) - shift) * scale
        noise = torch.randn(latents.shape, generator=generator)
        u = torch.sigmoid(torch.randn(len(index), generator=generator))
        sigmas = math.exp(TRAIN_MU) / (math.exp(TRAIN_MU) + (1 / u - 1))
        guidance = 1.0 + 4.0 * float(torch.rand(1, generator=generator))
        captions = pool["caption"][index]
        progress.set_lr(config.lr * _lr_factor(step, config.steps, config.warmup, config.min_lr_ratio))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            if text is None:
                embeds, pooled = pool["prompt_embeds"][captions].float(), pool["pooled_prompt_embeds"][captions].float()
            else:
                embeds, pooled = text(captions)
            loss = flow_matching_loss(pipe.transformer, latents, embeds, pooled, sigmas, noise, guidance)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.item()))
        progress.step_done(step + 1, float(np.mean(losses[-10:])))
    trained.eval().requires_grad_(False)
    _save(done_path, {"transformer": trained.state_dict()})
    ckpt.unlink(missing_ok=True)


def train_mini(out: Path, config: MiniTrainConfig) -> Path:
    """Run (or resume) every stage into ``out``; returns the weights file."""
    torch.set_num_threads(config.threads)
    out.mkdir(parents=True, exist_ok=True)
    _check_resumable(out, config)
    pipe = build_mini_pipeline(weights=None)
    scaling = train_vae(pipe, config, out)
    pipe.vae.register_to_config(**scaling)
    pool = encode_pool(pipe, config, out)
    train_transformer(pipe, pool, config, out)
    refine_decoder(pipe, config, out)
    modules = {"transformer": pipe.transformer, "vae": pipe.vae, "text_encoder": pipe.text_encoder,
               "text_encoder_2": pipe.text_encoder_2}
    metadata = {"format": FORMAT, "base_resolution": str(BASE_RESOLUTION), "training": json.dumps(asdict(config))}
    path = save_weights(out / WEIGHTS_NAME, modules, scaling, metadata)
    _log(f"weights: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


def _check_resumable(out: Path, config: MiniTrainConfig) -> None:
    """Refuse to resume a stage that has started with other settings; record the settings."""
    settings = out / "config.json"
    if settings.exists():
        previous = json.loads(settings.read_text())
        current = asdict(config)
        for stage, names in STAGE_FIELDS.items():
            started = any((out / name).exists() for name in STAGE_FILES[stage])
            changed = [n for n in names if previous.get(n) != current[n]]
            if started and changed:
                raise SystemExit(f"{out}: the {stage} stage was started with other {', '.join(changed)}; use another --out")
    settings.write_text(json.dumps(asdict(config), indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m urae.mini.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for checkpoints and the weights (resumable)")
    parser.add_argument("--quick", action="store_true", help="a few steps of every stage (for tests)")
    parser.add_argument("--install", action="store_true", help=f"copy the weights to {WEIGHTS_PATH}")
    for f in fields(MiniTrainConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default) if f.type != "bool" else int, default=None)
    args = parser.parse_args(argv)
    config = MiniTrainConfig(**QUICK) if args.quick else MiniTrainConfig()
    overrides = {f.name: getattr(args, f.name) for f in fields(MiniTrainConfig) if getattr(args, f.name) is not None}
    booleans = {f.name for f in fields(MiniTrainConfig) if f.type == "bool"}
    config = replace(config, **{k: bool(v) if k in booleans else v for k, v in overrides.items()})
    path = train_mini(args.out, config)
    if args.install:
        WEIGHTS_PATH.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, WEIGHTS_PATH)
        _log(f"installed {WEIGHTS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
