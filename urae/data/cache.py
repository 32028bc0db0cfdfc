"""Cache prompt embeddings and VAE latent posteriors to safetensors, so training holds neither the
text encoders nor the VAE.

One file per dataset item, ``{key}.safetensors``, holding the T5 and CLIP embeddings of the prompt
(and of the generated prompt when the dataset has one) and the posterior mean and std of the bucketed
image. Its header records a fingerprint of everything that produced it; an item whose file carries the
right fingerprint is skipped, so an interrupted caching run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from urae.data.buckets import fit_to_bucket, nearest_bucket
from urae.data.dataset import DatasetItem
from urae.errors import DatasetError
from urae.vae_decode import encode_pixels

CACHE_FORMAT = "urae-cache-1"


@dataclass(frozen=True)
class CacheReport:
    cached: int  # items encoded in this run
    skipped: int  # items whose cache file was already complete
    folder: Path


@dataclass
class CachedItem:
    """A cached training example, as the training loop reads it."""

    key: str
    latent_mean: torch.Tensor  # (C, H/8, W/8), the VAE posterior before FLUX's shift and scale
    latent_std: torch.Tensor
    prompt_embeds: torch.Tensor  # (T5 tokens, T5 width)
    pooled_prompt_embeds: torch.Tensor  # (CLIP projection width,)
    generated_prompt_embeds: torch.Tensor | None
    generated_pooled_prompt_embeds: torch.Tensor | None

    @property
    def bucket(self) -> tuple[int, int]:
        """Latent (height, width): items with equal buckets can share a batch."""
        return int(self.latent_mean.shape[-2]), int(self.latent_mean.shape[-1])


def item_fingerprint(
    item: DatasetItem, model_id: str, resolution: int, max_sequence_length: int, resize_mode: str = "stretch"
) -> str:
    """Hash of the image bytes, captions and encoding settings that a cache file was made from."""
    digest = hashlib.sha256()
    digest.update(item.image.read_bytes())
    settings = [CACHE_FORMAT, model_id, resolution, max_sequence_length, item.prompt, item.generated_prompt, resize_mode]
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()


def cache_path(cache_dir: Path, item: DatasetItem) -> Path:
    return cache_dir / f"{item.key}.safetensors"


def is_cached(path: Path, fingerprint: str) -> bool:
    """True when ``path`` is a complete cache file made from the same inputs."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint") == fingerprint
    except Exception:  # a truncated or foreign file: re-encode it
        return False


def encode_prompt(pipe: FluxPipeline, prompt: str, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 sequence embeddings and the pooled CLIP embedding of one prompt."""
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            max_sequence_length=max_sequence_length,
        )
    return embeds[0], pooled[0]


def encode_posterior(vae: AutoencoderKL, image: Image.Image, tiled: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of ``image``.

    ``tiled`` None: a plain encode within the 2K pixel budget, above it the exact banded encode (the
    same numbers in bounded memory, see urae.vae_exact); True: diffusers' tiled encode, which blends
    the tiles' moments (not exact); False: a plain encode at any size.
    """
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1)[None].to(vae.device, vae.dtype)
    was_tiling = vae.use_tiling
    vae.use_tiling = bool(tiled)
    try:
        posterior = encode_pixels(vae, pixels, "auto" if tiled is None else "full")
    finally:
        vae.use_tiling = was_tiling
    return posterior.mean[0], posterior.std[0]


def cache_dataset(
    pipe: FluxPipeline,
    items: list[DatasetItem],
    cache_dir: str | Path,
    *,
    model_id: str,
    resolution: int,
    max_sequence_length: int = 512,
    resize_mode: str = "stretch",
    tiled: bool | None = None,
    on_item: Callable[[int, int], None] | None = None,
    progress: bool = True,
) -> CacheReport:
    """Encode every item not already cached; ``on_item(done, total)`` after each item.

    ``resize_mode``: how an image takes its bucket's size, ``stretch`` (the reference) or ``crop``
    (see :func:`urae.data.buckets.fit_to_bucket`).
    """
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    cached = skipped = 0
    bar = tqdm(items, desc="cache", unit="img", disable=not progress)
    for done, item in enumerate(bar, start=1):
        path = cache_path(folder, item)
        fingerprint = item_fingerprint(item, model_id, resolution, max_sequence_length, resize_mode)
        if is_cached(path, fingerprint):
            skipped += 1
        else:
            _write_item(pipe, item, path, fingerprint, resolution, max_sequence_length, resize_mode, tiled)
            cached += 1
        bar.set_postfix(cached=cached, skipped=skipped)
        if on_item is not None:
            on_item(done, len(items))
    return CacheReport(cached, skipped, folder)


def _write_item(
    pipe: FluxPipeline,
    item: DatasetItem,
    path: Path,
    fingerprint: str,
    resolution: int,
    max_sequence_length: int,
    resize_mode: str,
    tiled: bool | None,
) -> None:
    try:
        with Image.open(item.image) as img:
            image = fit_to_bucket(img, nearest_bucket(item.width, item.height, resolution), resize_mode)
    except OSError as exc:
        raise DatasetError(str(item.image.parent), [(item.image.name, f"unreadable image ({exc})")]) from exc
    mean, std = encode_posterior(pipe.vae, image, tiled)
    embeds, pooled = encode_prompt(pipe, item.prompt, max_sequence_length)
    tensors = {"latent_mean": mean, "latent_std": std, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if item.generated_prompt is not None:
        tensors["generated_prompt_embeds"], tensors["generated_pooled_prompt_embeds"] = encode_prompt(
            pipe, item.generated_prompt, max_sequence_length
        )
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"fingerprint": fingerprint, "format": CACHE_FORMAT, "width": str(image.width), "height": str(image.height)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_cached(cache_dir: str | Path, items: list[DatasetItem]) -> list[CachedItem]:
    """Read the cache files of ``items`` (all of them must exist)."""
    folder = Path(cache_dir)
    result = []
    for item in items:
        data = load_file(str(cache_path(folder, item)))
        result.append(
            CachedItem(
                key=item.key,
                latent_mean=data["latent_mean"],
                latent_std=data["latent_std"],
                prompt_embeds=data["prompt_embeds"],
                pooled_prompt_embeds=data["pooled_prompt_embeds"],
                generated_prompt_embeds=data.get("generated_prompt_embeds"),
                generated_pooled_prompt_embeds=data.get("generated_pooled_prompt_embeds"),
            )
        )
    return result
