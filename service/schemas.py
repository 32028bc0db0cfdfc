"""HTTP request and response bodies. They wrap the job contract; the bounds are the library's."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from jobstore.contract import (
    ADAPTER_NAME_PATTERN,
    ASPECT_RATIOS,
    MAX_ADAPTERS_PER_REQUEST,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_PIXELS,
    MAX_PREVIEW_EVERY,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MAX_WEBHOOK_URL_CHARS,
    MIN_SIDE,
    SIZE_MULTIPLE,
    AdapterWeight,
    Priority,
    Tier,
    WebhookEvent,
    pixel_limit_error,
    preset_for_pixels,
    preset_size,
)


class GenerateRequest(BaseModel):
    """A text-to-image request: a preset with an aspect ratio, or an explicit width and height."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "a lighthouse at dawn, ultra detailed", "preset": "2k", "aspect_ratio": "16:9", "seed": 7},
                {"prompt": "a red fox", "width": 256, "height": 256, "steps": 4, "num_images": 2,
                 "adapters": [{"name": "my-style", "weight": 0.8}], "output_format": "webp", "priority": "high"},
            ]
        },
    )

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    preset: Literal["1k", "2k", "4k"] | None = Field(
        default=None, description="Resolution preset; picks adapter, RoPE, shift, steps. Default: from the size."
    )
    aspect_ratio: str = Field(default="1:1", description=f"With a preset: one of {', '.join(ASPECT_RATIOS)}")
    width: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)
    height: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, description="Default: the preset's")
    guidance: float | None = Field(default=None, ge=0.0, le=MAX_GUIDANCE, description="Default: the preset's")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Default: chosen by the server, reported")
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES)
    adapters: list[AdapterWeight] = Field(default=[], max_length=MAX_ADAPTERS_PER_REQUEST)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    priority: Priority = "normal"
    tier: Tier = Field(
        default="quality",
        description="quality (default), fast (fp8 on GPUs that have it) or turbo (step cache); refused when "
        "no live worker serves it",
    )
    preview_every: int | None = Field(
        default=None, ge=0, le=MAX_PREVIEW_EVERY,
        description="A live preview (event: preview) every this many steps; 0: none. Default: the server's",
    )
    webhook: str | None = Field(
        default=None, min_length=1, max_length=MAX_WEBHOOK_URL_CHARS,
        description="http(s) URL that receives the job's events, signed (Standard Webhooks)",
    )
    webhook_events: list[WebhookEvent] | None = Field(
        default=None, max_length=5, description="Which events the webhook receives. Default: completed, failed, canceled",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("aspect_ratio")
    @classmethod
    def _known_ratio(cls, value: str) -> str:
        if value not in ASPECT_RATIOS:
            raise ValueError(f"must be one of {', '.join(ASPECT_RATIOS)}")
        return value

    @field_validator("adapters")
    @classmethod
    def _distinct_adapters(cls, value: list[AdapterWeight]) -> list[AdapterWeight]:
        names = [a.name for a in value]
        if len(set(names)) != len(names):
            raise ValueError("an adapter is listed twice")
        return value

    @model_validator(mode="after")
    def _size(self) -> GenerateRequest:
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height go together: give both or neither")
        if self.width is not None and self.height is not None and self.width * self.height > MAX_PIXELS:
            raise ValueError(pixel_limit_error(self.width, self.height))
        return self

    def size(self) -> tuple[int, int]:
        """The image size this request produces."""
        if self.width is not None and self.height is not None:
            return self.width, self.height
        return preset_size(self.preset or "1k", self.aspect_ratio)

    def resolved_preset(self) -> Literal["1k", "2k", "4k"]:
        if self.preset is not None:
            return self.preset
        width, height = self.size()
        return preset_for_pixels(width * height)


class Links(BaseModel):
    self: str
    events: str
    images: list[str] = []


class Progress(BaseModel):
    stage: str
    step: int
    total: int
    loss: float | None = None
    eta_s: float | None = None


class JobPublic(BaseModel):
    """A job as clients see it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"id": "3f2a9c0e8b7d4f1a9e6c5b4a3d2e1f00", "kind": "generate", "status": "started",
                 "priority": "normal", "queue_position": None,
                 "progress": {"stage": "denoise", "step": 12, "total": 28},
                 "timings": {"queued": 0.01, "text_encode": 0.4},
                 "links": {"self": "/jobs/3f2a9c0e8b7d4f1a9e6c5b4a3d2e1f00",
                           "events": "/jobs/3f2a9c0e8b7d4f1a9e6c5b4a3d2e1f00/events", "images": []},
                 "error": None, "result": None, "created_at": 1764300000.0}
            ]
        }
    )

    id: str
    kind: str
    status: Literal["queued", "started", "finished", "failed", "canceled"]
    priority: str | None = None
    queue_position: int | None = None
    progress: Progress | None = None
    timings: dict[str, float] = {}
    links: Links
    error: str | None = None
    result: dict[str, Any] | None = None
    created_at: float
    started_at: float | None = None
    ended_at: float | None = None
    webhook: WebhookTargetPublic | None = None
    webhooks: list[WebhookAttempt] = []
    # What the model will not read of the prompt: the finished job's come from the worker's tokenizers;
    # POST /generate's answer carries the API's estimate (it has no tokenizer).
    warnings: list[str] = []


class WebhookTargetPublic(BaseModel):
    url: str
    events: list[str]


class WebhookAttempt(BaseModel):
    """One delivery attempt of a webhook event. ``outcome``: delivered, retrying, gave_up or refused."""

    event: str
    attempt: int
    status_code: int | None = None
    error: str | None = None
    at: float
    outcome: str | None = None
    id: str | None = None
    next_attempt_in_s: float | None = None


class ErrorBody(BaseModel):
    """Every error answer: a readable message, and for validation errors the field."""

    detail: str
    field: str | None = None


class AdapterPublic(BaseModel):
    name: str
    builtin: bool = False
    version: str | None = None
    # The rank the adapter was trained at; export_rank: the rank of the plain LoRA it is served as
    # (larger for a minor-component adapter: 2r, plus the rank of the LoRA fused before its split).
    rank: int | None = None
    export_rank: int | None = None
    size_bytes: int | None = None
    source: str | None = None
    description: str = ""
    created_at: float | None = None


class AdapterList(BaseModel):
    adapters: list[AdapterPublic]


class FinetuneRecipe(BaseModel):
    """Training parameters, checked before queueing (mirrors urae.train.TrainConfig; a test keeps the
    two in sync). ``recipe`` names a shipped recipe (urae-2k, urae-4k) that the other keys override.
    Paths, the model and the device are the server's: they cannot be set here."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"recipe": "urae-2k", "steps": 200, "rank": 8}]},
    )

    recipe: Literal["urae-2k", "urae-4k"] | None = None
    base_adapter: str | None = Field(default=None, pattern=ADAPTER_NAME_PATTERN)
    adapter_kind: Literal["minor_components", "lora"] | None = None
    rank: int | None = Field(default=None, ge=1, le=256)
    alpha: float | None = Field(default=None, gt=0)
    targets: list[str] | str | None = None
    resolution: int | None = Field(default=None, ge=64, le=MAX_SIDE, multiple_of=64)
    resize_mode: Literal["stretch", "crop"] | None = None
    max_sequence_length: int | None = Field(default=None, ge=1, le=512)
    steps: int | None = Field(default=None, ge=1, le=100_000)
    learning_rate: float | None = Field(default=None, gt=0.0, le=10.0)
    optimizer: Literal["adamw", "prodigy"] | None = None
    weight_decay: float | None = Field(default=None, ge=0.0, le=1.0)
    adam_beta1: float | None = Field(default=None, ge=0.0, lt=1.0)
    adam_beta2: float | None = Field(default=None, ge=0.0, lt=1.0)
    adam_epsilon: float | None = Field(default=None, gt=0.0, le=1.0)
    prodigy_use_bias_correction: bool | None = None
    prodigy_safeguard_warmup: bool | None = None
    prodigy_decouple: bool | None = None
    schedule: Literal["constant", "cosine"] | None = None
    warmup: int | None = Field(default=None, ge=0)
    grad_clip: float | None = Field(default=None, ge=0.0)
    batch_size: int | None = Field(default=None, ge=1, le=64)
    global_batch_size: int | None = Field(default=None, ge=1, le=1024)
    guidance: float | None = Field(default=None, ge=0.0, le=MAX_GUIDANCE)
    timestep_sampling: Literal["uniform", "logit_normal"] | None = None
    logit_mean: float | None = Field(default=None, ge=-10.0, le=10.0)
    logit_std: float | None = Field(default=None, ge=1e-3, le=10.0)
    ntk_factor: float | None = Field(default=None, ge=1.0, le=100.0)
    proportional_attention: bool | None = None
    mixed_precision: Literal["no", "bf16"] | None = None
    gradient_checkpointing: bool | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    checkpoint_every: int | None = Field(default=None, ge=0)
    keep_checkpoints: int | None = Field(default=None, ge=1)
    sample_every: int | None = Field(default=None, ge=0)
    sample_prompts: list[str] | None = Field(default=None, max_length=16)
    sample_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    sample_guidance: float | None = Field(default=None, ge=0.0, le=MAX_GUIDANCE)
    real_prompt_ratio: float | None = Field(default=None, ge=0.0, le=1.0)

    @field_validator("global_batch_size")
    @classmethod
    def _whole_accumulation(cls, value: int | None, info: ValidationInfo) -> int | None:
        # A worker is one process: a step accumulates global_batch_size / batch_size passes.
        batch = info.data.get("batch_size")
        if value is not None and batch is not None and value % batch:
            raise ValueError(f"{value} is not a multiple of batch_size {batch}")
        return value


# TrainConfig fields the server sets itself.
SERVER_TRAIN_FIELDS = ("model_id", "dataset_dir", "output_dir", "cache_dir", "device", "resume", "progress_bar")


ADAPTER_NAME_FIELD = Field(pattern=ADAPTER_NAME_PATTERN, description="lower-case letters, digits, '-' and '_'")
