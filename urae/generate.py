"""Generation with URAE's high-resolution settings on a resident FLUX.1 pipeline.

A :class:`Generator` owns one loaded pipeline and serves many :class:`GenerationSpec` requests:
per request it activates the requested adapters (hot-swapped, see urae.adapters), applies the
preset's attention settings and timestep schedule, denoises with per-step progress and cooperative
cancellation, and decodes with a memory-bounded VAE decode.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image, ImageOps

from urae.attention import apply_high_res_settings
from urae.errors import GenerationCanceled, InvalidSpecError, ModelLoadError
from urae.memory import PeakMemory
from urae.memory_profile import plan_memory, prepare_pipeline
from urae.models import DEFAULT_MODEL, is_schnell, load_pipeline
from urae.output import tensor_to_images
from urae.previews import (
    DEFAULT_MAX_SIDE,
    PreviewRenderer,
    PreviewSink,
    TinyAutoencoderPreview,
    latent_rgb_map_for,
    latents_to_preview,
)
from urae.spec import DEFAULT_STRENGTH, GenerationSpec
from urae.text_encoding import PromptEncoder, has_group_offload, resolve_offload
from urae.tiers import SpeedSetup
from urae.vae_decode import choose_mode, decode_latents_reporting_mode, encode_pixels

if TYPE_CHECKING:
    from urae.adapters.manager import AdapterManager

ProgressCallback = Callable[["Progress"], None]
CancelCheck = Callable[[], bool]
# An adapter name -> its file, or (file, sha256) when the hash is already known (a registry record).
AdapterResolver = Callable[[str], Path | tuple[Path, str]]
DEFAULT_SLOT_RANK = 64

log = logging.getLogger("urae.generate")
_VERSIONED = ("urae-serve", "torch", "diffusers", "transformers", "peft")


@dataclass(frozen=True)
class Progress:
    """One progress event: ``stage`` is text_encode, denoise or decode; ``step`` of ``total``."""

    stage: str
    step: int
    total: int
    elapsed: float


@dataclass
class GenerationResult:
    images: list[Image.Image]
    metadata: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    # What the model did not read of the prompt (cut by CLIP's 77 tokens or T5's max_sequence_length).
    warnings: list[str] = field(default_factory=list)


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def make_scheduler(base_config: Any, shift: float | None) -> FlowMatchEulerDiscreteScheduler:
    """The model's own scheduler when ``shift`` is None, else a static-shift one.

    Above the trained length the dynamic shift extrapolates mu (11.55 at 4096 px) and every sigma of
    the schedule stays ~1.0: the image never denoises. URAE uses the model's own shift as a static
    shift instead (3.0 for dev, 1.0 for schnell; see urae.presets).
    """
    if shift is None:
        return FlowMatchEulerDiscreteScheduler.from_config(base_config)
    return FlowMatchEulerDiscreteScheduler.from_config(base_config, use_dynamic_shifting=False, shift=shift)


def timestep_sigmas(base_config: Any, steps: int, image_tokens: int, shift: float | None) -> list[float]:
    """The sigmas a generation with these settings walks through (what the pipeline computes)."""
    scheduler = make_scheduler(base_config, shift)
    mu = calculate_shift(
        image_tokens,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
    return [float(s) for s in scheduler.sigmas[:-1]]


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` in RGB at exactly width x height: scaled to cover it and centre-cropped (its aspect
    ratio is kept; what does not fit is cut evenly from both sides)."""
    return ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class _StartPoint:
    """Where an image-to-image run starts: the input's packed latents and the schedule's tail."""

    latents: torch.Tensor
    sigmas: list[float]
    start_sigma: float
    strength: float
    source_size: tuple[int, int]
    skipped_steps: int
    encode_mode: str

    def noised(self, pipe: FluxPipeline, spec: GenerationSpec, seeded: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """The input noised to the first sigma that is run, with the very noise a text-to-image run of
        this seed starts from (so strength 1 is that run)."""
        noise, _ = pipe.prepare_latents(
            1, pipe.transformer.config.in_channels // 4, spec.height, spec.width, dtype, self.latents.device, seeded,
        )
        sigma = self.start_sigma
        return (sigma * noise.float() + (1.0 - sigma) * self.latents.float()).to(dtype)

    def describe(self) -> dict[str, Any]:
        return {"width": self.source_size[0], "height": self.source_size[1], "strength": self.strength,
                "skipped_steps": self.skipped_steps, "encode": self.encode_mode}


class Generator:
    """A resident FLUX.1 pipeline serving generation specs."""

    def __init__(
        self,
        pipe: FluxPipeline,
        model_id: str,
        adapter_resolver: AdapterResolver | None = None,
        adapter_capacity: int = 8,
        hotswap_rank: int | None = None,
        preview_autoencoder: str | Path | None = None,
        text_encoder_offload: str = "auto",
        prompt_cache_size: int = 32,
        *,
        adapter_slots: int = 2,
        tiers: Sequence[str] | None = None,
        compile: bool | str | None = None,
        attention_backend: str = "auto",
        memory_profile: str = "default",
        idle_adapter_slots: str = "compute",
    ):
        self.pipe = pipe
        # A local tiny-autoencoder folder for previews; None: the linear latent -> RGB map.
        self.preview_autoencoder = preview_autoencoder
        self.preview_max_side = DEFAULT_MAX_SIDE
        self._preview_render: Callable[[torch.Tensor, int, int], np.ndarray] | None = None
        self.model_id = model_id
        self.schnell = is_schnell(pipe)
        self._base_scheduler_config = pipe.scheduler.config
        self._adapter_resolver = adapter_resolver
        self._adapter_capacity = adapter_capacity
        self._hotswap_rank = hotswap_rank
        self._adapters: AdapterManager | None = None
        self._adapter_slots = adapter_slots
        pipe.set_progress_bar_config(disable=True)
        # Tiers, attention kernel, fp8 and compiled blocks (see urae.tiers); creates the adapter
        # slots first when compiling, so the compiled graph already has them.
        self.speed = SpeedSetup.apply(self, tiers, compile, attention_backend, memory_profile, idle_adapter_slots)
        if self.speed.memory.text_encoders_off_gpu:
            # The profile streams both encoders from CPU memory (its notes say if one could not be).
            text_encoder_offload = "group" if has_group_offload(pipe.text_encoder_2) else "none"
        # T5 off the GPU between encodes, and an LRU of prompt embeddings (see urae.text_encoding).
        pipeline_offloaded = getattr(pipe.text_encoder_2, "_hf_hook", None) is not None
        self.prompts = PromptEncoder(
            pipe, model_id, prompt_cache_size,
            resolve_offload(text_encoder_offload, pipe._execution_device, "hooks" if pipeline_offloaded else None),
        )

    @classmethod
    def load(
        cls,
        model_id: str = DEFAULT_MODEL,
        device: str = "cpu",
        dtype: str | torch.dtype = "bfloat16",
        offload: str | None = None,
        adapter_resolver: AdapterResolver | None = None,
        adapter_capacity: int = 8,
        hotswap_rank: int | None = None,
        text_encoder_offload: str = "auto",
        prompt_cache_size: int = 32,
        *,
        adapter_slots: int = 2,
        tiers: Sequence[str] | None = None,
        compile: bool | str | None = None,
        attention_backend: str = "auto",
        memory_profile: str = "default",
        idle_adapter_slots: str = "compute",
    ) -> Generator:
        """Load a pipeline and prepare it to serve ``tiers`` (default quality and turbo).

        ``compile`` None: compiled blocks on CUDA only. ``attention_backend`` "auto": the best kernel
        the device offers (see :func:`urae.models.choose_attention_backend`). ``memory_profile``: see
        :mod:`urae.memory_profile` (``24gb``: loaded in CPU memory, the transformer quantized onto the
        GPU layer by layer).
        """
        plan = plan_memory(memory_profile, device)
        if plan.weights is not None and torch.device(device).type != "cpu":
            if offload is not None:
                raise ModelLoadError(f"memory profile {memory_profile} already keeps the text encoders off the GPU "
                                     f"and the weights in 8 bits: leave CPU offload ({offload}) unset")
            pipe = load_pipeline(model_id, device="cpu", dtype=dtype)
            prepare_pipeline(pipe, plan, device)
        else:
            pipe = load_pipeline(model_id, device=device, dtype=dtype, offload=offload)
        return cls(pipe, model_id, adapter_resolver, adapter_capacity, hotswap_rank,
                    text_encoder_offload=text_encoder_offload, prompt_cache_size=prompt_cache_size,
                    adapter_slots=adapter_slots, tiers=tiers, compile=compile, attention_backend=attention_backend,
                    memory_profile=memory_profile, idle_adapter_slots=idle_adapter_slots)

    @property
    def adapters(self) -> AdapterManager:
        """The adapter slots and cache of this pipeline (created on first use, or before compiling)."""
        if self._adapters is None:
            from urae.adapters.manager import AdapterManager

            self._adapters = AdapterManager(
                self.pipe, capacity=self._adapter_capacity, rank=self._hotswap_rank or DEFAULT_SLOT_RANK,
                slots=self._adapter_slots,
            )
        return self._adapters

    def resolve_adapter(self, name: str) -> Path | tuple[Path, str]:
        if self._adapter_resolver is not None:
            return self._adapter_resolver(name)
        from urae.adapters.builtin import resolve_adapter

        return resolve_adapter(name, self.model_id)

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    def generate(
        self,
        spec: GenerationSpec,
        on_progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        on_preview: PreviewSink | None = None,
        preview_every: int = 0,
        image: Image.Image | None = None,
    ) -> GenerationResult:
        """Generate ``spec.num_images`` images; seeds are ``spec.seed + i``.

        With ``image`` (image to image): the image is fitted to the spec's size (scaled to cover it,
        then centre-cropped), encoded, noised to the schedule's point at ``spec.strength`` (default
        :data:`~urae.spec.DEFAULT_STRENGTH`) with the noise a generation of that seed starts from, and
        denoised for the rest of the schedule. Strength 1 is the text-to-image run of the same seed.

        Raises GenerationCanceled (before any decode) when ``should_cancel`` returns True at a step
        boundary. With ``on_preview`` and ``preview_every`` > 0, every ``preview_every``-th step's
        latents are rendered as a small preview in a background thread and passed to ``on_preview``
        there (see urae.previews); denoising never waits for it.
        """
        # 1. Check inputs
        spec.validate()
        self.speed.check_tier(spec.tier)
        if image is not None and spec.strength is None:
            spec = replace(spec, strength=DEFAULT_STRENGTH)
        elif image is None and spec.strength is not None:
            raise InvalidSpecError("strength", "applies to an input image, and none was given")
        pipe = self.pipe
        timings: dict[str, float] = {}
        started = time.perf_counter()
        peak = PeakMemory(self.device)
        peak.start()

        def report(stage: str, step: int, total: int) -> None:
            if on_progress is not None:
                on_progress(Progress(stage, step, total, time.perf_counter() - started))

        def check_cancel(step: int) -> None:
            if should_cancel is not None and should_cancel():
                raise GenerationCanceled(step, spec.steps)

        # 2. Adapters: load what is missing (cached), then exactly these with these weights
        adapter_records = self._activate_adapters(spec)

        # 3. Attention settings, timestep schedule and step cache of the preset and tier
        self._apply_settings(spec)
        check_cancel(0)

        # 4. Encode the prompt (once for all images)
        report("text_encode", 0, 1)
        t0 = time.perf_counter()
        prompt_embeds, pooled_embeds, cached = self.prompts.encode(spec.prompt, spec.max_sequence_length, self.device)
        timings["text_encode"] = time.perf_counter() - t0
        timings["prompt_cache_hit"] = float(cached)
        warnings = self.prompts.truncation_warnings(spec.prompt, spec.max_sequence_length)
        report("text_encode", 1, 1)
        check_cancel(0)

        # 5. Image to image: the input's latents and the schedule's tail that is run over them.
        run_steps = spec.steps_run()
        start = self._start_point(spec, image, timings)
        check_cancel(0)

        # 6. Denoise and decode each image with its own seed, one at a time: image i is exactly the
        # image a request with seed + i and num_images 1 gives, and the peak memory is one image's.
        total = run_steps * spec.num_images
        timings["denoise"] = timings["decode"] = 0.0
        images: list[Image.Image] = []
        decode_modes: list[str] = []  # per image: auto falls back to tiles on out-of-memory
        for index in range(spec.num_images):
            done = index * run_steps

            previews = self._previews(spec, on_preview, preview_every)

            # Stop by raising from the step callback: setting pipe._interrupt would only skip the
            # remaining steps and still decode a half-denoised image.
            def on_step_end(
                _pipe: FluxPipeline, i: int, _t: Any, kwargs: dict[str, Any], done: int = done, index: int = index,
                previews: PreviewRenderer | None = previews,
            ) -> Any:
                report("denoise", done + i + 1, total)
                check_cancel(done + i + 1)
                if previews is not None and (i + 1) % preview_every == 0:
                    previews.submit(done + i + 1, total, index, kwargs["latents"])
                return kwargs

            report("denoise", done, total)
            t0 = time.perf_counter()
            # Wall-clock time: lets a worker show that the next job denoises while this one's image is written.
            timings.setdefault("denoise_started_at", time.time())
            seeded = torch.Generator(device="cpu").manual_seed(spec.seed + index)
            schedule: dict[str, Any] = {"num_inference_steps": spec.steps}
            if start is not None:
                schedule = {"num_inference_steps": run_steps, "sigmas": start.sigmas,
                            "latents": start.noised(pipe, spec, seeded, prompt_embeds.dtype)}
            try:
                packed = pipe(
                    prompt_embeds=prompt_embeds,
                    pooled_prompt_embeds=pooled_embeds,
                    height=spec.height,
                    width=spec.width,
                    guidance_scale=spec.guidance,
                    generator=seeded,
                    output_type="latent",
                    callback_on_step_end=on_step_end,
                    max_sequence_length=spec.max_sequence_length,
                    **schedule,
                ).images
            finally:
                if previews is not None:
                    previews.close()
            timings["denoise"] += time.perf_counter() - t0

            # 7. Memory-bounded decode
            report("decode", index, spec.num_images)
            t0 = time.perf_counter()
            latents = pipe._unpack_latents(packed, spec.height, spec.width, pipe.vae_scale_factor)
            decode_request = self.speed.memory.decode_mode(spec.vae_decode, spec.height, spec.width)
            decoded, decode_mode = decode_latents_reporting_mode(pipe.vae, latents.to(pipe.vae.device), decode_request)
            decode_modes.append(decode_mode)
            images.extend(tensor_to_images(decoded))
            timings["decode"] += time.perf_counter() - t0
        report("decode", spec.num_images, spec.num_images)
        timings[peak.key] = float(peak.stop())

        metadata = [self._metadata(spec, spec.seed + i, adapter_records) for i in range(spec.num_images)]
        for meta, decode_mode in zip(metadata, decode_modes, strict=True):
            meta["vae_decode"] = decode_mode
            if start is not None:
                meta["input_image"] = start.describe()
        return GenerationResult(images=images, metadata=metadata, timings=timings, warnings=warnings)

    def _start_point(self, spec: GenerationSpec, image: Image.Image | None, timings: dict[str, float]) -> _StartPoint | None:
        """For an image-to-image spec: the input encoded at the spec's size and the schedule's tail."""
        if image is None:
            return None
        assert spec.strength is not None
        t0 = time.perf_counter()
        pipe = self.pipe
        fitted = fit_image(image, spec.width, spec.height)
        pixels = torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        decode_request = self.speed.memory.decode_mode(spec.vae_decode, spec.height, spec.width)
        # The plain encode within the 2K budget, the exact banded one above it (the same numbers in
        # bounded memory), as the decode chooses.
        encode_mode = "full" if choose_mode(decode_request, spec.height, spec.width) == "full" else "exact"
        posterior = encode_pixels(pipe.vae, pixels.to(pipe.vae.device), encode_mode)
        latents = (posterior.mode() - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        channels, h, w = latents.shape[1:]
        packed = pipe._pack_latents(latents, 1, channels, h, w).to(self.device)
        # The unshifted sigmas of the whole schedule, from its first step that is run: the scheduler
        # shifts each alike, so the run walks exactly the tail of the full schedule.
        skipped = spec.skipped_steps()
        sigmas = np.linspace(1.0, 1 / spec.steps, spec.steps)[skipped:].tolist()
        start_sigma = timestep_sigmas(self._base_scheduler_config, spec.steps, spec.image_tokens, spec.shift)[skipped]
        timings["encode_image"] = time.perf_counter() - t0
        return _StartPoint(packed, sigmas, start_sigma, spec.strength, image.size, skipped, encode_mode)

    def _previews(self, spec: GenerationSpec, sink: PreviewSink | None, every: int) -> PreviewRenderer | None:
        """A preview renderer for one image, or None when previews are off."""
        if sink is None or every <= 0:
            return None
        if self._preview_render is None:
            self._preview_render = self._make_preview_render()
        return PreviewRenderer(self._preview_render, sink, spec.width, spec.height, self.pipe.vae_scale_factor)

    def _make_preview_render(self) -> Callable[[torch.Tensor, int, int], np.ndarray]:
        vae = self.pipe.vae
        if self.preview_autoencoder is not None:
            try:
                decoder = TinyAutoencoderPreview.load(self.preview_autoencoder, vae, self.device, vae.dtype)
                return lambda latents, width, height: decoder(latents, width, height, self.preview_max_side)
            except (OSError, ValueError) as exc:
                log.warning("preview autoencoder %s not usable (%s); using the linear latent map", self.preview_autoencoder, exc)
        rgb_map = latent_rgb_map_for(vae)
        return lambda latents, width, height: latents_to_preview(latents, rgb_map, width, height, self.preview_max_side)

    def _apply_settings(self, spec: GenerationSpec) -> None:
        """Attention settings, timestep schedule and step cache: values only, never a new graph."""
        apply_high_res_settings(
            self.pipe.transformer, spec.ntk_factor, spec.proportional_attention,
            num_tokens=spec.max_sequence_length + spec.image_tokens,
        )
        self.pipe.scheduler = make_scheduler(self._base_scheduler_config, spec.shift)
        self.speed.set_tier(spec.tier, spec.preset)

    def capabilities(self) -> dict[str, Any]:
        """What this generator serves and how: tiers, attention kernel, precision, compilation, and
        how many adapters one image may mix."""
        return {**self.speed.describe(), "adapter_slots": self._adapter_slots}

    def warm_up(
        self, specs: Sequence[GenerationSpec], on_each: Callable[[GenerationSpec, float], None] | None = None
    ) -> int:
        """Run every spec once (2 denoising steps, no decode).

        Compiles each (size, tier) graph and caches each preset adapter, so that serving them later
        neither compiles nor reads a file. Returns the number of runs.
        """
        for spec in specs:
            started = time.perf_counter()
            spec.validate()
            self.speed.check_tier(spec.tier)
            self._activate_adapters(spec)
            self._apply_settings(spec)
            prompt_embeds, pooled_embeds, _ = self.prompts.encode(spec.prompt, spec.max_sequence_length, self.device)
            self.pipe(
                prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_embeds, height=spec.height,
                width=spec.width, num_inference_steps=min(spec.steps, 2), guidance_scale=spec.guidance,
                generator=torch.Generator(device="cpu").manual_seed(0), output_type="latent",
                max_sequence_length=spec.max_sequence_length,
            )
            if on_each is not None:
                on_each(spec, time.perf_counter() - started)
        return len(specs)

    def _activate_adapters(self, spec: GenerationSpec) -> list[dict[str, Any]]:
        self.speed.use_adapter_slots(self.pipe.transformer, bool(spec.adapters))
        if not spec.adapters:
            if self._adapters is not None:
                self._adapters.activate([])
            return []
        manager = self.adapters
        for ref in spec.adapters:
            source = self.resolve_adapter(ref.name)
            # A registry resolver may also give the hash it recorded when the file was registered.
            path, sha = source if isinstance(source, tuple) else (source, None)
            manager.ensure(ref.name, path, sha256=sha)
        manager.activate(list(spec.adapters))
        return [
            {"name": ref.name, "weight": ref.weight, "sha256": manager.sha256(ref.name)}
            for ref in spec.adapters
        ]

    def _metadata(self, spec: GenerationSpec, seed: int, adapters: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "prompt": spec.prompt,
            "seed": seed,
            "width": spec.width,
            "height": spec.height,
            "steps": spec.steps,
            "guidance": spec.guidance,
            "preset": spec.preset,
            "model": self.model_id,
            "max_sequence_length": spec.max_sequence_length,
            "ntk_factor": spec.ntk_factor,
            "proportional_attention": spec.proportional_attention,
            "shift": spec.shift,
            "vae_decode": choose_mode(spec.vae_decode, spec.height, spec.width),
            "adapters": adapters,
            "tier": spec.tier,
            "strength": spec.strength,
            **self.speed.metadata(spec.tier, spec.preset),
            "versions": library_versions(),
        }
