"""The job contract shared by the API and the workers: names, statuses, payloads, storage layout.

Imports no torch and no web framework. The API enqueues jobs by the dotted function names below, so
it never imports the worker code; the worker validates the same payload models before running.
The bounds mirror ``urae.spec`` (a test asserts they are equal) so that bad requests are refused
before anything is queued.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field, model_validator

# -- bounds (mirror urae/spec.py) ------------------------------------------------------------------
SIZE_MULTIPLE = 16
MIN_SIDE = 64
MAX_SIDE = 8192
MAX_PIXELS = 4096 * 4160  # 4096^2 plus 64 rows: the 4K preset's 4:3 and 3:2 sizes go slightly above 4096^2
PIXEL_LIMIT_TEXT = f"{MAX_PIXELS:,} pixels (width x height; 4096x4160 is the largest with a 4096 side)"
MAX_STEPS = 100
MAX_GUIDANCE = 30.0
MAX_PROMPT_CHARS = 2000
MAX_IMAGES = 4
MAX_SEED = 2**63 - 1
MAX_ADAPTERS_PER_REQUEST = 8
ADAPTER_WEIGHT_RANGE = (-4.0, 4.0)
# Image to image: the share of the schedule run over the input image when a request gives no strength.
DEFAULT_STRENGTH = 0.45
# An input image may declare at most this many pixels (8192 x 8192); refused from its header, before
# a pixel is decoded. It is fitted to the requested size, so a larger one adds nothing but memory.
MAX_INPUT_IMAGE_PIXELS = 8192 * 8192

# -- presets (mirror urae/presets.py) ---------------------------------------------------------------
PRESET_LONG_SIDE = {"1k": 1024, "2k": 2048, "4k": 4096}
ASPECT_RATIOS = ("1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "2:1", "1:2", "4:1", "1:4")
BUILTIN_ADAPTERS = ("urae-2k", "urae-4k", "urae-4k-schnell")
# Speed tiers (mirror urae/spec.py): quality (default), fast (fp8), turbo (step cache).
TIERS = ("quality", "fast", "turbo")
Tier = Literal["quality", "fast", "turbo"]
# Training recipes shipped with the library (urae/train/recipes), selectable by name in /finetune.
SHIPPED_RECIPES = ("urae-2k", "urae-4k")

# -- names and ids -----------------------------------------------------------------------------------
# Strict on purpose: these become Redis keys and file names. No dots, slashes, percent signs or
# non-ASCII characters can pass, so "../", absolute paths and encoded tricks are refused up front.
ADAPTER_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
# base_adapter of a minor-component upload whose SVD split was made on the plain base model; reserved.
NO_BASE_ADAPTER = "none"
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
DATASET_NAME_PATTERN = ADAPTER_NAME_PATTERN
ADAPTER_NAME_RE = re.compile(ADAPTER_NAME_PATTERN)
JOB_ID_RE = re.compile(JOB_ID_PATTERN)

OUTPUT_FORMATS = ("png", "jpeg", "webp")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# What an input image may be (its media type -> the format): the output formats.
INPUT_IMAGE_TYPES = {content_type: fmt for fmt, content_type in CONTENT_TYPES.items()}
FILE_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


class JobStatus(StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL_STATUSES = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED})


class JobKind(StrEnum):
    GENERATE = "generate"
    FINETUNE = "finetune"
    ADAPTER_IMPORT = "adapter_import"


Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")

# -- queues and job functions ------------------------------------------------------------------------
QUEUE_PREFIX = "urae"


def generate_queue(priority: str) -> str:
    """RQ queue name of a generation priority; workers serve them in the order of PRIORITIES."""
    return f"{QUEUE_PREFIX}-generate-{priority}"


GENERATE_QUEUES = tuple(generate_queue(p) for p in PRIORITIES)
FINETUNE_QUEUE = f"{QUEUE_PREFIX}-finetune"
# Conversion of an uploaded adapter needs the base transformer: the generation workers do it, first.
ADAPTER_IMPORT_QUEUE = generate_queue("high")

JOB_FUNCTIONS = {
    JobKind.GENERATE: "worker.jobs.run_generate",
    JobKind.FINETUNE: "worker.jobs.run_finetune",
    JobKind.ADAPTER_IMPORT: "worker.jobs.run_adapter_import",
}

# -- Redis keys --------------------------------------------------------------------------------------
KEY_PREFIX = "urae"
RUNNING_JOBS_KEY = f"{KEY_PREFIX}:running"  # hash job id -> worker name, while a job runs
WORKERS_KEY = f"{KEY_PREFIX}:workers"  # set of worker names that have ever heartbeaten
ADAPTERS_KEY = f"{KEY_PREFIX}:adapters"  # hash adapter name -> JSON record
# hash "<model>/<built-in name>" -> JSON description of its file (version, ranks, size), written by workers
BUILTIN_ADAPTERS_KEY = f"{KEY_PREFIX}:builtin-adapters"
JOB_COUNTS_KEY = f"{KEY_PREFIX}:metrics:jobs"  # hash status -> number of transitions into it
STAGE_HISTOGRAM_PREFIX = f"{KEY_PREFIX}:metrics:stage:"
STAGE_NAMES = ("queued", "text_encode", "denoise", "decode", "write")
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def job_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:job:{job_id}"


def job_events_key(job_id: str) -> str:
    """A Redis stream of the job's events: replayable, so a late SSE client still sees them all."""
    return f"{KEY_PREFIX}:job:{job_id}:events"


def job_cancel_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:job:{job_id}:cancel"


def job_lease_key(job_id: str) -> str:
    """Refreshed by the process running the job; when it expires the job's runner is dead."""
    return f"{KEY_PREFIX}:job:{job_id}:lease"


def job_preview_key(job_id: str) -> str:
    """The job's latest preview (JSON with a JPEG data URL); the event stream carries only markers."""
    return f"{KEY_PREFIX}:job:{job_id}:preview"


def job_webhook_throttle_key(job_id: str) -> str:
    """Exists while progress webhooks of the job are throttled."""
    return f"{KEY_PREFIX}:job:{job_id}:webhook-progress"


def idempotency_key(owner: str, key: str) -> str:
    return f"{KEY_PREFIX}:idempotency:{owner}:{key}"


def worker_key(name: str) -> str:
    return f"{KEY_PREFIX}:worker:{name}"


# -- storage layout ----------------------------------------------------------------------------------
def image_object(job_id: str, index: int, fmt: str) -> str:
    return f"jobs/{job_id}/{index}.{FILE_EXTENSIONS[fmt]}"


def adapter_object(name: str, version: str) -> str:
    # A new upload under an existing name gets a new file, so a worker never serves stale weights.
    return f"adapters/{name}/{version}.safetensors"


def upload_object(job_id: str, suffix: str) -> str:
    return f"uploads/{job_id}{suffix}"


def dataset_prefix(name: str) -> str:
    return f"datasets/{name}"


def finetune_work_prefix(job_id: str) -> str:
    return f"finetune/{job_id}"


# -- webhooks ----------------------------------------------------------------------------------------
WebhookEvent = Literal["started", "progress", "completed", "failed", "canceled"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("started", "progress", "completed", "failed", "canceled")
DEFAULT_WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("completed", "failed", "canceled")
# The status a transition enters -> the webhook event it sends.
STATUS_WEBHOOK_EVENTS: dict[str, WebhookEvent] = {
    "started": "started", "finished": "completed", "failed": "failed", "canceled": "canceled",
}
MAX_WEBHOOK_URL_CHARS = 2000
# -- previews ----------------------------------------------------------------------------------------
MAX_PREVIEW_EVERY = MAX_STEPS


# -- payloads (what travels through Redis, JSON only) -------------------------------------------------
class AdapterWeight(BaseModel):
    name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    weight: float = Field(default=1.0, ge=ADAPTER_WEIGHT_RANGE[0], le=ADAPTER_WEIGHT_RANGE[1])


class InputImage(BaseModel):
    """An image-to-image job's input: an uploaded file (``key``, owned by the job: deleted when it
    ends) or image ``index`` of an earlier finished job (``job``), read when the job runs."""

    key: str | None = None
    job: str | None = Field(default=None, pattern=JOB_ID_PATTERN)
    index: int = Field(default=0, ge=0, lt=MAX_IMAGES)

    @model_validator(mode="after")
    def _one_source(self) -> InputImage:
        if (self.key is None) == (self.job is None):
            raise ValueError("an input image is an uploaded key or a job's image, exactly one")
        return self


class GeneratePayload(BaseModel):
    """Arguments of ``worker.jobs.run_generate``; the worker resolves them into a GenerationSpec."""

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    prompt: str
    preset: Literal["1k", "2k", "4k"]
    aspect_ratio: str = "1:1"
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int
    num_images: int = 1
    adapters: list[AdapterWeight] = []
    output_format: Literal["png", "jpeg", "webp"] = "png"
    # Registered adapter name -> the version the job was submitted with; the worker refuses another.
    adapter_versions: dict[str, str] = {}
    # A preview every this many steps; 0: none; None: default_preview_every(URAE_PREVIEW_EVERY, steps).
    preview_every: int | None = Field(default=None, ge=0, le=MAX_PREVIEW_EVERY)
    tier: Tier = "quality"
    # Image to image: the input, and the share of the schedule run over it (set whenever image is).
    image: InputImage | None = None
    strength: float | None = Field(default=None, gt=0.0, le=1.0)


def input_upload_object(job_id: str, fmt: str) -> str:
    """Storage key of an image-to-image job's uploaded input."""
    return upload_object(job_id, f".input.{FILE_EXTENSIONS[fmt]}")


def upload_job_id(key: str) -> str:
    """The job that owns an object under ``uploads/`` (its name starts with the job's id)."""
    return key.rsplit("/", 1)[-1].split(".", 1)[0]


def default_preview_every(setting: int, steps: int) -> int:
    """The preview cadence of a request that does not choose one: ``URAE_PREVIEW_EVERY``, closer
    together for short runs so that about four previews show the image forming before it is done:
    min(setting, max(1, steps // 4)). 0 (previews off) stays off."""
    if setting <= 0:
        return 0
    return min(setting, max(1, steps // 4))


class AdapterImportPayload(BaseModel):
    """Arguments of ``worker.jobs.run_adapter_import``: validate and convert an uploaded file."""

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    upload: str  # storage key of the uploaded file
    description: str = ""
    # A minor-component file is converted on top of this adapter (URAE's 4K file: "urae-2k");
    # NO_BASE_ADAPTER when it was split from the plain base. None: a plain LoRA.
    base_adapter: str | None = Field(default=None, pattern=ADAPTER_NAME_PATTERN)
    source: str = "upload"
    # What the name held when the API accepted the job: "" (free) or the version being replaced. The
    # worker registers only if that is still so (None: not checked).
    replaces: str | None = None


class FinetunePayload(BaseModel):
    """Arguments of ``worker.jobs.run_finetune``."""

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    adapter_name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    dataset: str = Field(pattern=DATASET_NAME_PATTERN)
    recipe: dict[str, object] = {}
    # As AdapterImportPayload.replaces, for the trained adapter's name.
    replaces: str | None = None


def pixel_limit_error(width: int, height: int) -> str:
    """The message for a size above MAX_PIXELS (mirrors urae.spec.pixel_limit_error)."""
    return f"{width}x{height} is {width * height:,} pixels; the maximum is {PIXEL_LIMIT_TEXT}"


# -- sizes (mirror urae.presets.size_for_aspect) ------------------------------------------------------
def preset_size(preset: str, aspect_ratio: str) -> tuple[int, int]:
    """Width and height a preset gives at an aspect ratio (about long_side**2 pixels)."""
    long_side = PRESET_LONG_SIDE[preset]
    w_part, h_part = (float(x) for x in aspect_ratio.split(":"))
    area = long_side * long_side
    ratio = w_part / h_part
    return _round16(math.sqrt(area * ratio)), _round16(math.sqrt(area / ratio))


def preset_for_pixels(pixels: int) -> Literal["1k", "2k", "4k"]:
    """The preset row (adapter, RoPE, shift...) for an explicit size: the smallest that covers it."""
    if pixels <= PRESET_LONG_SIDE["1k"] ** 2:
        return "1k"
    if pixels <= PRESET_LONG_SIDE["2k"] ** 2:
        return "2k"
    return "4k"


def _round16(x: float) -> int:
    return max(SIZE_MULTIPLE, int(round(x / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
