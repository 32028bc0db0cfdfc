"""HTTP request and response bodies. They wrap the job contract; the bounds are the library's."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from jobstore.contract import (
    ADAPTER_NAME_PATTERN,
    ASPECT_RATIOS,
    DEFAULT_STRENGTH,
    JOB_ID_PATTERN,
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
from service.prompts import has_visible_text


class ImageRef(BaseModel):
    """Image ``index`` of one of the caller's own finished generation jobs."""

    model_config = ConfigDict(extra="forbid")

    job: str = Field(pattern=JOB_ID_PATTERN, description="the job's id (32 lower-case hex digits)")
    index: int = Field(default=0, ge=0, lt=MAX_IMAGES)


STRENGTH_DESCRIPTION = (
    "Image to image: the share of the schedule run over the input image, 0 < strength <= 1 (1: from noise, "
    f"the input only sets the framing). Only with an image; default {DEFAULT_STRENGTH}"
)


class GenerateRequest(BaseModel):
    """A text-to-image request: a preset with an aspect ratio, or an explicit width and height; with
    ``image``, image to image (the input is fitted to the size: scaled to cover it, centre-cropped)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "a lighthouse at dawn, ultra detailed", "preset": "2k", "aspect_ratio": "16:9", "seed": 7},
                {"prompt": "a red fox", "width": 256, "height": 256, "steps": 4, "num_images": 2,
                 "adapters": [{"name": "my-style", "weight": 0.8}], "output_format": "webp", "priority": "high"},
                {"prompt": "a lighthouse at dawn", "preset": "2k", "image": "data:image/png;base64,iVBORw0KGgo...",
                 "strength": 0.6},
                {"prompt": "a lighthouse at dawn", "preset": "4k",
                 "image": {"job": "3f2a9c0e8b7d4f1a9e6c5b4a3d2e1f00", "index": 0}, "strength": 0.5},
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
        description="A live preview (event: preview) every this many steps; 0: none. Default: the server's "
        "URAE_PREVIEW_EVERY, closer together for short runs: min(URAE_PREVIEW_EVERY, max(1, steps // 4))",
    )
    webhook: str | None = Field(
        default=None, min_length=1, max_length=MAX_WEBHOOK_URL_CHARS,
        description="http(s) URL that receives the job's events, signed (Standard Webhooks)",
    )
    webhook_events: list[WebhookEvent] | None = Field(
        default=None, max_length=5, description="Which events the webhook receives. Default: completed, failed, canceled",
    )
    image: str | ImageRef | None = Field(
        default=None,
        description="Image to image: a data: URL (data:image/png|jpeg|webp;base64,...) of at most "
        "URAE_MAX_INPUT_IMAGE_BYTES and 8192x8192 pixels, or {\"job\": id, \"index\": n}: an image of one of "
        "your finished generation jobs",
    )
    strength: float | None = Field(default=None, gt=0.0, le=1.0, description=STRENGTH_DESCRIPTION)

    @field_validator("image", mode="before")
    @classmethod
    def _image_form(cls, value: Any) -> Any:
        # One message per form instead of one per member of the union.
        if value is None or isinstance(value, str | ImageRef):
            return value
        if not isinstance(value, dict):
            raise ValueError('must be a data: URL or {"job": id, "index": n}')
        try:
            return ImageRef.model_validate(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{where + ': ' if where else ''}{first['msg']}") from None

    @field_validator("strength")
    @classmethod
    def _strength_needs_image(cls, value: float | None, info: ValidationInfo) -> float | None:
        # image is declared first: validated (or refused) by now.
        if value is not None and "image" in info.data and info.data["image"] is None:
            raise ValueError("applies to an input image, and none was given")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not has_visible_text(value):
            raise ValueError("must not be blank (it has no visible character)")
        return value

    @field_validator("aspect_ratio")
    @classmethod
    def _known_ratio(cls, value: str, info: ValidationInfo) -> str:
        if value in ASPECT_RATIOS:
            return value
        if info.context and info.context.get("any_aspect_ratio"):
            # A refine keeps its draft's exact framing (W:H in lowest terms), within the library's 4:1.
            w, _, h = value.partition(":")
            if w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0 and max(int(w) / int(h), int(h) / int(w)) <= 4:
                return value
            raise ValueError(f"{value!r}: the draft's aspect ratio is beyond 4:1")
        raise ValueError(f"must be one of {', '.join(ASPECT_RATIOS)}")

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

    def input_strength(self) -> float | None:
        """The strength the job runs with: the request's, the default with an image, None without."""
        if self.image is None:
            return None
        return self.strength if self.strength is not None else DEFAULT_STRENGTH

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


class RefineRequest(BaseModel):
    """Make one image of a finished generation again at another size (image to image from it)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"preset": "4k"}, {"preset": "2k", "strength": 0.5, "index": 1},
                                        {"width": 2048, "height": 1152, "tier": "fast"}]},
    )

    preset: Literal["1k", "2k", "4k"] | None = Field(
        default=None, description="Target preset; the size keeps the draft's aspect ratio. Or width and height")
    width: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)
    height: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)
    strength: float | None = Field(default=None, gt=0.0, le=1.0, description=STRENGTH_DESCRIPTION)
    index: int = Field(default=0, ge=0, lt=MAX_IMAGES, description="Which image of the draft")
    tier: Tier | None = Field(default=None, description="Default: the draft's")
    priority: Priority = "normal"
    output_format: Literal["png", "jpeg", "webp"] | None = Field(default=None, description="Default: the draft's")
    preview_every: int | None = Field(default=None, ge=0, le=MAX_PREVIEW_EVERY)
    webhook: str | None = Field(default=None, min_length=1, max_length=MAX_WEBHOOK_URL_CHARS)
    webhook_events: list[WebhookEvent] | None = Field(default=None, max_length=5)

    @model_validator(mode="after")
    def _target(self) -> RefineRequest:
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height go together: give both or neither")
        if (self.preset is None) == (self.width is None):
            raise ValueError("give the target size: a preset, or width and height (one of the two)")
        if self.width is not None and self.height is not None and self.width * self.height > MAX_PIXELS:
            raise ValueError(pixel_limit_error(self.width, self.height))
        return self


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
