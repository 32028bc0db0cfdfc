"""Prompt encoding for a resident pipeline: an LRU of prompt embeddings and T5-XXL kept off the GPU.

T5-XXL is 4.7 B parameters (9.5 GB in bf16) and runs once per request, for a few milliseconds of
compute; the transformer runs 28 times. Keeping T5 resident costs ~9.5 GB of GPU memory through
the whole denoise. With ``offload="group"`` T5 lives in pinned CPU memory and diffusers' group
offloading streams its layers onto the GPU while it runs (copies overlapped with compute on a
side stream), then frees them. A repeated prompt skips both text encoders: its embeddings come from
a small LRU keyed by (prompt, max_sequence_length, model).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch

TEXT_ENCODER_OFFLOAD_MODES = ("auto", "none", "group")
_CacheKey = tuple[str, int, str]


def resolve_offload(mode: str, device: torch.device | str, pipeline_offload: str | None) -> str:
    """The effective mode: ``auto`` is ``group`` on CUDA, ``none`` elsewhere; model/sequential CPU
    offload of the whole pipeline already moves T5, so it takes precedence."""
    if mode not in TEXT_ENCODER_OFFLOAD_MODES:
        raise ValueError(f"text encoder offload {mode!r} is not one of {', '.join(TEXT_ENCODER_OFFLOAD_MODES)}")
    if pipeline_offload is not None:
        return "none"
    if mode == "auto":
        return "group" if torch.device(device).type == "cuda" else "none"
    return mode


def has_group_offload(module: torch.nn.Module) -> bool:
    """Whether diffusers' group offloading manages any part of ``module``."""
    return any(
        "group_offloading" in getattr(getattr(m, "_diffusers_hook", None), "hooks", {}) for m in module.modules()
    )


class PromptEncoder:
    """Encodes prompts with the pipeline's CLIP and T5, through an LRU of recent results.

    Cached embeddings are kept on the CPU (a 512-token T5 embedding is 4 MiB in bf16), so the cache
    holds no GPU memory; a hit copies them to the device.
    """

    def __init__(self, pipe: Any, model_id: str, cache_size: int = 32, offload: str = "none"):
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self.pipe = pipe
        self.model_id = model_id
        self.cache_size = cache_size
        self.offload = offload
        self.hits = 0
        self.misses = 0
        self._cache: OrderedDict[_CacheKey, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        if offload == "group":
            self._offload_t5()
        elif offload != "none":
            raise ValueError(f"text encoder offload {offload!r} is not one of none, group")

    def _offload_t5(self) -> None:
        from diffusers.hooks import apply_group_offloading

        t5 = self.pipe.text_encoder_2
        if t5 is None or has_group_offload(t5):
            return  # a second generator on the same pipeline: the hooks are there already
        device = self.pipe._execution_device
        # Leaf level: every Linear/Embedding/norm is its own group, so at most a layer or two of T5
        # is on the GPU at a time; with a CUDA stream the next layer's copy overlaps this one's compute.
        apply_group_offloading(
            t5,
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=torch.device(device).type == "cuda",
        )

    def encode(
        self, prompt: str, max_sequence_length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(T5 embeddings, pooled CLIP embedding, cache hit) for one prompt, on ``device``."""
        key = (prompt, max_sequence_length, self.model_id)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self.hits += 1
        if cached is not None:
            return cached[0].to(device), cached[1].to(device), True
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=max_sequence_length,
        )
        with self._lock:
            self.misses += 1
            if self.cache_size > 0:
                self._cache[key] = (prompt_embeds.detach().to("cpu", copy=True), pooled.detach().to("cpu", copy=True))
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return prompt_embeds, pooled, False

    def truncation_warnings(self, prompt: str, max_sequence_length: int) -> list[str]:
        """What the text encoders will not read of ``prompt``, counted with the pipeline's own
        tokenizers: CLIP reads at most its 77 tokens, T5 at most ``max_sequence_length``."""
        return prompt_truncation_warnings(self.pipe, prompt, max_sequence_length)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)


def _token_count(tokenizer: Any, prompt: str) -> int:
    # Without truncation, with the special tokens the pipeline adds (CLIP: start and end; T5: end).
    return len(tokenizer(prompt, truncation=False, add_special_tokens=True, verbose=False)["input_ids"])


def prompt_truncation_warnings(pipe: Any, prompt: str, max_sequence_length: int) -> list[str]:
    """A readable warning per text encoder that cuts ``prompt`` (FluxPipeline truncates silently)."""
    warnings: list[str] = []
    clip = getattr(pipe, "tokenizer", None)
    if clip is not None:
        limit = int(getattr(pipe, "tokenizer_max_length", None) or clip.model_max_length)
        count = _token_count(clip, prompt)
        if count > limit:
            warnings.append(f"the prompt is {count} CLIP tokens; CLIP reads only the first {limit} "
                            "(its pooled embedding ignores the rest)")
    t5 = getattr(pipe, "tokenizer_2", None)
    if t5 is not None:
        count = _token_count(t5, prompt)
        if count > max_sequence_length:
            warnings.append(f"the prompt is {count} T5 tokens; only the first {max_sequence_length} are used "
                            f"(max_sequence_length {max_sequence_length}): the rest of the prompt is ignored")
    return warnings
