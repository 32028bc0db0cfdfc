"""``train``: cache the dataset, adapt the FLUX transformer, checkpoint, and export a plain LoRA.

The loop runs under accelerate's Accelerator, so ``accelerate launch`` spreads it over several GPUs
(data parallel; each process takes its own batches). Every random draw of a step (posterior sample,
noise, sigma, prompt choice) comes from a generator seeded by (seed, global batch index), and the data
order is a pure function of (seed, epoch): a resumed run repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from PIL import Image
from torch import nn
from tqdm import tqdm

from urae.data.cache import CachedItem, cache_dataset, encode_prompt, load_cached
from urae.data.dataset import dataset_hash, scan_dataset
from urae.errors import InvalidSpecError, TrainingCanceled
from urae.train.adapter_layers import (
    LoraFactors,
    LowRankLinear,
    export_factors,
    fuse_lora,
    install_adapters,
    load_trainable_state,
    resolve_targets,
    trainable_state,
)
from urae.train.checkpoints import (
    RESUME_KEYS,
    checkpoint_root,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from urae.train.config import TrainConfig
from urae.train.flow_matching import flow_matching_loss, sample_sigmas

logger = logging.getLogger(__name__)

ADAPTER_FILENAME = "adapter.safetensors"
LOSS_LOG_FILENAME = "loss.jsonl"
# Above FLUX's trained length the dynamic shift extrapolates badly (PITFALLS.md): samples there use
# the model's own shift as a static one (dev 3.0, schnell 1.0), as the 2K/4K presets do.
TRAINED_LONG_SIDE = 1024


@dataclass
class TrainProgress:
    step: int  # steps (or cached items) done
    total: int
    loss: float  # loss of the last step (nan while caching)
    eta_s: float  # estimated seconds left in this stage
    stage: str  # "cache" | "train" | "export"


@dataclass
class TrainResult:
    adapter_path: Path
    steps: int
    final_loss: float
    loss_log: Path
    metadata: dict[str, str] = field(default_factory=dict)


def train(
    config: TrainConfig,
    on_progress: Callable[[TrainProgress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> TrainResult:
    """Run a whole training: dataset check, cache, adaptation, export (see the module docstring).

    ``should_cancel()`` is polled between cached items and at every step boundary; True raises
    :class:`TrainingCanceled` (during training after saving a checkpoint). A bad dataset raises
    DatasetError before any model is loaded.
    """
    config.validate()
    report = on_progress or (lambda progress: None)
    # 1. Check the whole dataset first: nothing is trained on part of it.
    items = scan_dataset(config.dataset_dir, min_long_side=config.resolution // 2)
    optimizer_class = _optimizer_class(config.optimizer)
    accelerator = _make_accelerator(config)
    accumulation = config.accumulation_steps(accelerator.num_processes)
    device = accelerator.device
    weight_dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    config.output_dir.mkdir(parents=True, exist_ok=True)

    # 2. Load the model and cache embeddings and latents (the main process writes the cache).
    from urae.models import load_pipeline

    pipe = load_pipeline(config.model_id, device=str(device), dtype=weight_dtype)
    cache_dir = config.resolved_cache_dir()
    if accelerator.is_main_process:
        started = time.monotonic()

        def on_item(done: int, total: int) -> None:
            eta = (time.monotonic() - started) / done * (total - done)
            report(TrainProgress(done, total, math.nan, eta, "cache"))
            # Caching thousands of 4K images takes long: cancel between items too (finished items stay).
            if should_cancel is not None and done < total and should_cancel():
                raise TrainingCanceled(0, config.steps)

        cache_dataset(
            pipe,
            items,
            cache_dir,
            model_id=config.model_id,
            resolution=config.resolution,
            max_sequence_length=config.max_sequence_length,
            resize_mode=config.resize_mode,
            on_item=on_item,
            progress=config.progress_bar,
        )
    accelerator.wait_for_everyone()
    sampling = bool(config.sample_every and config.sample_prompts)
    sample_embeds = [encode_prompt(pipe, p, config.max_sequence_length) for p in config.sample_prompts] if sampling else []
    # Training holds neither text encoder; the VAE waits on the CPU for samples only.
    pipe.text_encoder = None
    pipe.text_encoder_2 = None
    pipe.vae.to("cpu")
    data = load_cached(cache_dir, items)
    vae_shift = float(pipe.vae.config.shift_factor or 0.0)
    vae_scale = float(pipe.vae.config.scaling_factor)

    # 3. Install the adapters on the base with the base adapter fused (the target layers fuse it in
    # the same float64 step as their split), after the high-resolution settings.
    transformer = pipe.transformer
    base_factors = _load_base_adapter(config, transformer)
    paths = resolve_targets(transformer, config.targets)
    fuse_lora(transformer, {k: v for k, v in base_factors.items() if k not in paths})
    if config.ntk_factor != 1.0 or config.proportional_attention:
        from urae.attention import apply_high_res_settings

        apply_high_res_settings(transformer, config.ntk_factor, config.proportional_attention)
    layers = install_adapters(
        transformer,
        config.adapter_kind,
        paths,
        config.rank,
        config.lora_scale,
        config.seed,
        fused={k: v for k, v in base_factors.items() if k in paths},
        stored=_stored_target_weights(config, paths, weight_dtype),
    )
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    params = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
    optimizer = optimizer_class(params, **config.optimizer_settings())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    guidance = _training_guidance(config, transformer)

    # 4. Resume from the latest checkpoint, or start clean.
    start_step = _resume(config, layers, optimizer, scheduler)
    loss_log = config.output_dir / LOSS_LOG_FILENAME
    if accelerator.is_main_process:
        _truncate_loss_log(loss_log, start_step)
    # The scheduler is stepped by hand: accelerate's wrapper would step it once per process.
    model, optimizer = accelerator.prepare(transformer, optimizer)

    # 5. The loop.
    buckets = [item.bucket for item in data]
    last_saved = start_step
    last_loss = math.nan
    bar = tqdm(
        total=config.steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not (config.progress_bar and accelerator.is_main_process),
    )
    started = time.monotonic()

    resume_settings = {k: v for k, v in config.to_dict().items() if k in RESUME_KEYS}

    def save(step: int) -> None:
        nonlocal last_saved
        if accelerator.is_main_process and step > 0:
            state = {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "config": resume_settings,
            }
            save_checkpoint(config.output_dir, step, trainable_state(layers), state, config.keep_checkpoints)
        last_saved = step

    with open(loss_log, "a", encoding="utf-8") if accelerator.is_main_process else _NullLog() as log:
        for step in range(start_step, config.steps):
            if should_cancel is not None and should_cancel():
                if step > last_saved:
                    save(step)
                bar.close()
                raise TrainingCanceled(step, config.steps)
            # One optimizer step = ``accumulation`` passes on every process; each pass draws from
            # its own global index, so the samples of a step do not depend on the process count.
            step_loss = torch.zeros((), device=device)
            for micro in range(accumulation):
                global_index = (step * accumulation + micro) * accelerator.num_processes + accelerator.process_index
                generator = torch.Generator().manual_seed(_step_seed(config.seed, global_index))
                batch = _batch(data, buckets, config, global_index, generator)
                latents = ((batch.latent_mean + batch.latent_std * _randn_like(batch.latent_mean, generator)) - vae_shift) * vae_scale
                noise = _randn_like(latents, generator)
                sigmas = sample_sigmas(latents.shape[0], config.timestep_sampling, generator, config.logit_mean, config.logit_std)
                # Processes exchange gradients once per step, on its last pass.
                sync = micro == accumulation - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    loss = flow_matching_loss(
                        model,
                        latents.to(device, weight_dtype),
                        batch.prompt_embeds.to(device, weight_dtype),
                        batch.pooled_prompt_embeds.to(device, weight_dtype),
                        sigmas,
                        noise.to(device, weight_dtype),
                        guidance,
                    )
                    # The mean over the step's passes, as one batch of global_batch_size would give.
                    accelerator.backward(loss / accumulation)
                step_loss += loss.detach().float() / accumulation
            if config.grad_clip > 0:
                accelerator.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss = float(accelerator.reduce(step_loss, "mean").item())
            done = step + 1
            if not math.isfinite(last_loss):
                bar.close()
                raise InvalidSpecError(
                    "learning_rate", f"training diverged at step {done} (loss {last_loss}); lower the learning rate"
                )
            if accelerator.is_main_process:
                entry = {"step": done, "loss": last_loss, "lr": scheduler.get_last_lr()[0]}
                log.write(json.dumps(entry) + "\n")
                log.flush()
            elapsed = time.monotonic() - started
            eta = elapsed / (done - start_step) * (config.steps - done)
            bar.set_postfix(loss=f"{last_loss:.4f}")
            bar.update(1)
            report(TrainProgress(done, config.steps, last_loss, eta, "train"))
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                save(done)
            if sampling and done % config.sample_every == 0 and accelerator.is_main_process:
                _render_samples(pipe, sample_embeds, config, done, device)
    bar.close()

    # 6. Export: the whole adaptation as one plain LoRA on the ORIGINAL base weights.
    report(TrainProgress(config.steps, config.steps, last_loss, 0.0, "export"))
    save(config.steps)
    if not math.isfinite(last_loss):
        last_loss = _last_logged_loss(loss_log)
    metadata = _adapter_metadata(config, items, len(paths), last_loss)
    adapter_path = config.output_dir / ADAPTER_FILENAME
    if accelerator.is_main_process:
        from urae.adapters.formats import save_lora

        save_lora(adapter_path, export_factors(layers, base_factors), metadata)
    accelerator.wait_for_everyone()
    return TrainResult(adapter_path, config.steps, last_loss, loss_log, metadata)


class _NullLog:
    """Stands in for the loss log on processes other than the main one."""

    def __enter__(self) -> _NullLog:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, text: str) -> None:
        return None

    def flush(self) -> None:
        return None


def _make_accelerator(config: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # One process may run several trainings with different precisions; accelerate keeps its state
    # in a singleton that refuses a change, so reset it (the distributed setup itself is kept).
    AcceleratorState._reset_state()
    kwargs: dict[str, Any] = {"mixed_precision": config.mixed_precision}
    if config.device == "cpu":
        kwargs["cpu"] = True
    return Accelerator(**kwargs)


def _optimizer_class(name: str) -> Callable[..., torch.optim.Optimizer]:
    if name == "adamw":
        return torch.optim.AdamW
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise InvalidSpecError(
            "optimizer", "prodigy needs the optional package prodigyopt (pip install 'urae-serve[train]')"
        ) from None
    return Prodigy


def _lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the learning rate after ``step`` steps: linear warmup, then constant or cosine."""

    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        if config.schedule == "constant":
            return 1.0
        span = max(1, config.steps - config.warmup)
        progress = min(1.0, (step - config.warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _training_guidance(config: TrainConfig, transformer: FluxTransformer2DModel) -> float | None:
    if not transformer.config.guidance_embeds:
        return None
    if config.guidance != 1.0:
        logger.warning(
            "training a guidance-distilled model with guidance %s; URAE fixes it to 1 during adaptation",
            config.guidance,
        )
    return config.guidance


def _stored_target_weights(config: TrainConfig, paths: list[str], weight_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The targets' weights as stored, when the SVD split would otherwise see them rounded.

    FLUX.1 is published in bf16, so a bf16 run loads it exactly; a float32 base (a user's own
    fine-tune) trained in bf16 is split from its float32 weights instead.
    """
    from urae.models import stored_dtype, stored_transformer_tensors

    if config.adapter_kind != "minor_components":
        return {}
    if torch.finfo(stored_dtype(config.model_id)).bits <= torch.finfo(weight_dtype).bits:
        return {}
    found = stored_transformer_tensors(config.model_id, [f"{p}.weight" for p in paths])
    return {p: found[f"{p}.weight"] for p in paths if f"{p}.weight" in found}


def _load_base_adapter(config: TrainConfig, transformer: nn.Module) -> dict[str, LoraFactors]:
    if config.base_adapter is None:
        return {}
    from urae.adapters.builtin import resolve_adapter
    from urae.adapters.formats import AdapterFormat, load_adapter_layers

    path = resolve_adapter(config.base_adapter, config.model_id)
    adapter_format, layers = load_adapter_layers(path, transformer)
    if adapter_format is not AdapterFormat.LORA:
        raise InvalidSpecError("base_adapter", f"{path} is not a plain LoRA; convert it first (urae convert)")
    return {k: (up.float(), down.float()) for k, (up, down) in layers.items()}


def _resume(
    config: TrainConfig,
    layers: dict[str, LowRankLinear],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    """The step to start from: that of the latest checkpoint (its state loaded), or 0."""
    found = list_checkpoints(config.output_dir)
    if not config.resume:
        shutil.rmtree(checkpoint_root(config.output_dir), ignore_errors=True)
        return 0
    if not found:
        return 0
    step, folder = found[-1]
    adapter_state, state = load_checkpoint(folder)
    current = config.to_dict()
    changed = sorted(k for k in RESUME_KEYS if state["config"].get(k) != current[k])
    if changed:
        raise InvalidSpecError(
            "resume",
            f"{folder} was made with other settings ({', '.join(changed)}); "
            "use another output_dir or set resume to false",
        )
    if step > config.steps:
        raise InvalidSpecError("steps", f"{config.steps} is below the checkpoint's step {step} in {folder}")
    load_trainable_state(layers, adapter_state)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    logger.info("resuming from %s", folder)
    return step


def _truncate_loss_log(path: Path, step: int) -> None:
    """Keep the log lines of steps up to ``step`` (the rest is redone)."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _last_logged_loss(path: Path) -> float:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return float(json.loads(lines[-1])["loss"]) if lines else math.nan


def _step_seed(seed: int, global_index: int) -> int:
    return (seed * 1_000_003 + global_index) % (2**63)


def _randn_like(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(tensor.shape, generator=generator, dtype=torch.float32)


@lru_cache(maxsize=4)
def _epoch_plan(buckets: tuple[tuple[int, int], ...], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: items shuffled within their bucket, batches shuffled."""
    generator = torch.Generator().manual_seed(_step_seed(seed + 7919, epoch))
    groups: dict[tuple[int, int], list[int]] = {}
    for index, bucket in enumerate(buckets):
        groups.setdefault(bucket, []).append(index)
    batches: list[list[int]] = []
    for bucket in sorted(groups):
        members = groups[bucket]
        order = torch.randperm(len(members), generator=generator).tolist()
        shuffled = [members[i] for i in order]
        batches += [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


@dataclass
class _Batch:
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor


def _batch(
    data: list[CachedItem],
    buckets: list[tuple[int, int]],
    config: TrainConfig,
    global_index: int,
    generator: torch.Generator,
) -> _Batch:
    key = tuple(buckets)
    per_epoch = len(_epoch_plan(key, config.batch_size, config.seed, 0))
    plan = _epoch_plan(key, config.batch_size, config.seed, global_index // per_epoch)
    chosen = [data[i] for i in plan[global_index % per_epoch]]
    embeds, pooled = [], []
    for item in chosen:
        use_real = float(torch.rand(1, generator=generator)) < config.real_prompt_ratio
        if use_real or item.generated_prompt_embeds is None or item.generated_pooled_prompt_embeds is None:
            embeds.append(item.prompt_embeds)
            pooled.append(item.pooled_prompt_embeds)
        else:
            embeds.append(item.generated_prompt_embeds)
            pooled.append(item.generated_pooled_prompt_embeds)
    return _Batch(
        latent_mean=torch.stack([item.latent_mean for item in chosen]).float(),
        latent_std=torch.stack([item.latent_std for item in chosen]).float(),
        prompt_embeds=torch.stack(embeds),
        pooled_prompt_embeds=torch.stack(pooled),
    )


def _render_samples(
    pipe: FluxPipeline,
    sample_embeds: list[tuple[torch.Tensor, torch.Tensor]],
    config: TrainConfig,
    step: int,
    device: torch.device,
) -> None:
    """Render each sample prompt at the training resolution into output_dir/samples/."""
    from urae.generate import make_scheduler
    from urae.vae_decode import decode_latents

    folder = config.output_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    scheduler = pipe.scheduler
    if config.resolution > TRAINED_LONG_SIDE:
        pipe.scheduler = make_scheduler(scheduler.config, float(scheduler.config.get("shift", 3.0)))
    pipe.vae.to(device)
    pipe.set_progress_bar_config(disable=True)  # the training bar is the one that matters
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    try:
        for index, (embeds, pooled) in enumerate(sample_embeds):
            with torch.autocast(device.type, dtype=dtype, enabled=config.mixed_precision == "bf16"):
                packed = pipe(
                    prompt_embeds=embeds[None].to(device, dtype),
                    pooled_prompt_embeds=pooled[None].to(device, dtype),
                    height=config.resolution,
                    width=config.resolution,
                    num_inference_steps=config.sample_steps,
                    guidance_scale=config.sample_guidance,
                    generator=torch.Generator().manual_seed(config.seed + index),
                    output_type="latent",
                ).images
            latents = FluxPipeline._unpack_latents(packed, config.resolution, config.resolution, pipe.vae_scale_factor)
            pixels = decode_latents(pipe.vae, latents.float())[0]
            array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            path = folder / f"step-{step:06d}-{index}.png"
            tmp = path.with_name(path.name + ".tmp")
            Image.fromarray(array).save(tmp, format="PNG")
            os.replace(tmp, path)
    finally:
        pipe.vae.to("cpu")
        pipe.scheduler = scheduler


def _adapter_metadata(config: TrainConfig, items: list[Any], num_layers: int, final_loss: float) -> dict[str, str]:
    """What the safetensors header records about the adapter's origin."""
    return {
        "base_model": config.model_id,
        "base_adapter": config.base_adapter or "",
        "recipe": config.recipe or "",
        "adapter_kind": config.adapter_kind,
        "rank": str(config.rank),
        "trained_layers": str(num_layers),
        "resolution": str(config.resolution),
        "steps": str(config.steps),
        "final_loss": f"{final_loss:.6g}",
        "data_hash": dataset_hash(items),
        "data_items": str(len(items)),
        "training_config": json.dumps(config.to_dict(), sort_keys=True),
    }
