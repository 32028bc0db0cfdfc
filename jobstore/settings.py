"""One configuration for the API and the workers, from ``URAE_``-prefixed environment variables."""

from __future__ import annotations

import hashlib
import logging
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("urae.service")


class InsecureSettingsError(ValueError):
    """The configuration would expose the service without authentication."""


class SettingsError(Exception):
    """The environment does not make a usable configuration; the message is one readable line."""


class Settings(BaseSettings):
    """Every tunable of the service and the workers. See ``.env.example`` for one line per field."""

    # An empty value (``URAE_CACHE_DIR=`` as in .env.example, or ``${VAR:-}`` in a compose file) means
    # unset: the default, never Path("") == Path(".").
    model_config = SettingsConfigDict(env_prefix="URAE_", env_file=".env", extra="ignore", env_ignore_empty=True)

    env: Literal["development", "production"] = "production"
    # Comma-separated API keys, or their SHA-256 hex digests (preferred: the keys never sit in the env).
    api_keys: str = ""
    api_key_hashes: str = ""
    # Admin keys (plain or SHA-256 digests): valid keys that also see and manage every key's resources.
    admin_keys: str = ""
    admin_key_hashes: str = ""
    # Without keys, only an explicit development mode opens the API to anyone.
    dev_open_access: bool = False

    redis_url: str = "redis://localhost:6379/0"
    # Short timeouts: with Redis down the API answers 503 at once instead of hanging.
    redis_socket_timeout_s: float = 2.0
    # Local data folder: the storage when URAE_STORAGE_URL is unset, and the default home of the cache.
    storage_dir: Path = Path("data")
    # Where results, adapters and datasets live: a local path, or s3://bucket/prefix (an S3-compatible
    # store; credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, region from AWS_REGION).
    storage_url: str = ""
    s3_endpoint_url: str | None = None
    # Presigned download links are signed for this host (what clients reach); default: the endpoint.
    s3_public_endpoint_url: str | None = None
    # GET /jobs/{id}/images/{i}: redirect to a short-lived presigned URL instead of streaming the bytes.
    s3_presigned_downloads: bool = False
    s3_presigned_ttl_s: int = Field(default=300, ge=1, le=7 * 24 * 3600)
    # This process's own local files: copies of stored objects (keyed by content hash), upload spools.
    cache_dir: Path | None = None
    # Copies of stored objects beyond this many bytes are removed, least recently used first (0: no bound).
    cache_max_bytes: int = Field(default=50 * 1024**3, ge=0)

    model: str = "black-forest-labs/FLUX.1-dev"
    device: str = "cuda"
    dtype: str = "bfloat16"
    offload: str | None = None
    # CPU threads torch may use in a worker (None: torch's default, all cores). A CPU worker that
    # shares its host with the API leaves the API a core with 1.
    torch_threads: int | None = Field(default=None, ge=1)
    adapter_capacity: int = Field(default=8, ge=1)
    hotswap_rank: int | None = Field(default=64, ge=1)
    # Adapter slots always present in the transformer: the most adapters one request mixes (the
    # preset's URAE adapter and one of the user's); each is padded to URAE_HOTSWAP_RANK.
    adapter_slots: int = Field(default=2, ge=1, le=8)
    # Speed tiers this worker serves, comma-separated: quality,turbo (bf16) or fast,turbo (fp8, GPUs
    # with compute capability >= 8.9). Admission refuses a tier no live worker serves.
    tiers: str = "quality,turbo"
    # Compile the transformer blocks (torch.compile, regional). None: on CUDA only.
    compile: bool | None = None
    # Attention kernel: auto (the best the GPU offers: FA3, cuDNN, FA2, SDPA) or a diffusers backend name.
    attention_backend: str = "auto"
    # How a generation worker fits the model in GPU memory: default, or 24gb (transformer weights in
    # 8 bits, text encoders streamed from CPU memory, exact banded decode above 1K): 2K and 4K on 24 GB.
    memory_profile: Literal["default", "24gb"] = "default"
    # Requests without adapters: compute the adapter slots at weight 0 (compute), or skip them (skip:
    # a second set of compiled graphs, built during the warm-up).
    idle_adapter_slots: Literal["compute", "skip"] = "compute"
    # GPUs one generation worker drives for each image (diffusers' context parallelism): 1 is one GPU;
    # N spawns N-1 follower processes on GPUs 1..N-1. Ulysses (all-to-all of heads, N divides 24)
    # or ring (key/value blocks around the GPUs; needs a flash/cuDNN attention kernel).
    context_parallel: int = Field(default=1, ge=1, le=64)
    context_parallel_mode: Literal["ulysses", "ring"] = "ulysses"
    # Before reporting ready, run every served preset (presets), also at every aspect ratio (full), or
    # nothing (none) once, so that no request compiles; auto: presets on CUDA, none elsewhere.
    warmup: Literal["auto", "none", "presets", "full"] = "auto"
    adapter_cache_dir: Path | None = None
    # Largest image (pixels) a generation worker advertises; None: the library's maximum.
    worker_max_pixels: int | None = Field(default=None, ge=64 * 64)

    max_queue_depth: int = Field(default=100, ge=1)
    # Jobs one key may have waiting in the queues at once (0: no limit beyond the queue depth).
    max_queued_jobs_per_key: int = Field(default=50, ge=0)
    # Bytes one key may keep on the server: images, datasets, adapters (0: no quota).
    storage_quota_bytes: int = Field(default=20 * 1024**3, ge=0)
    # An uploaded dataset no fine-tune has used for this long is deleted (0: kept until deleted).
    dataset_ttl_s: int = Field(default=30 * 24 * 3600, ge=0)
    retry_after_s: int = Field(default=10, ge=1)
    # With no live worker for the model at all: queue anyway (False) or answer 503 (True).
    require_live_worker: bool = False
    # How long the API reuses the list of live workers (capabilities) for admission; 0: every request.
    worker_info_cache_s: float = Field(default=1.0, ge=0)
    job_timeout_s: int = Field(default=3600, ge=1)
    finetune_timeout_s: int = Field(default=6 * 3600, ge=1)
    result_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=1)

    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    # A job whose runner has not refreshed its lease for this long is failed (or retried once).
    lease_ttl_s: float = Field(default=20.0, gt=0)
    reaper_interval_s: float = Field(default=5.0, gt=0)
    retry_orphaned_jobs: bool = False
    # SIGTERM during a job: finish it within this many seconds, or put it back in the queue.
    shutdown_grace_s: float = Field(default=30.0, ge=0)

    max_adapter_bytes: int = Field(default=2 * 1024**3, ge=1024)
    adapter_import_wait_s: float = Field(default=60.0, ge=0)
    max_dataset_bytes: int = Field(default=1024**3, ge=1024)
    max_dataset_uncompressed_bytes: int = Field(default=4 * 1024**3, ge=1024)
    max_dataset_files: int = Field(default=20000, ge=1)
    sse_keepalive_s: float = Field(default=15.0, gt=0)
    # Request bodies of the JSON routes (the uploads have their own maxima above): refused past this
    # while the bytes arrive, before any parsing.
    max_json_body_bytes: int = Field(default=64 * 1024, ge=1024)
    # Image to image: the largest input image (decoded bytes of its data URL) POST /generate takes;
    # its body may be this times 4/3 (base64) plus max_json_body_bytes.
    max_input_image_bytes: int = Field(default=16 * 1024**2, ge=1024)
    # Request line and headers together, and their number: refused (431) before the app sees them.
    max_header_bytes: int = Field(default=64 * 1024, ge=4096)
    max_header_count: int = Field(default=100, ge=16)
    # SIGTERM: the API tells open event streams to reconnect and exits within this many seconds.
    api_shutdown_grace_s: float = Field(default=5.0, ge=0)
    # Event streams (SSE) one API process keeps open at once: per API key (429 past it) and in all
    # (503 past it; at most 3/4 of the connection bound). A waiting stream holds no Redis connection.
    max_event_streams_per_key: int = Field(default=200, ge=1)
    max_event_streams: int = Field(default=1000, ge=1)
    # Connections the API's async Redis client opens at most (a request waits for a free one).
    redis_max_connections: int = Field(default=50, ge=2)
    # A client has this long to send a request's line and headers (a slow or silent one is cut off);
    # the API keeps at most this many connections open (and never more than its open-file limit
    # leaves room for): past it, the oldest connection still sending its headers is dropped, or 503.
    header_timeout_s: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=2048, ge=16)

    # Live previews of a generation: every this many denoising steps (0: off; a request may override),
    # this many pixels on the long side; a local tiny-autoencoder folder (e.g. taef1) decodes them
    # when set, instead of the linear latent -> RGB map. Never downloaded.
    preview_every: int = Field(default=4, ge=0, le=100)
    preview_max_side: int = Field(default=256, ge=16, le=1024)
    preview_jpeg_quality: int = Field(default=70, ge=10, le=95)
    # T5-XXL off the GPU between encodes: auto (group offloading on CUDA, none elsewhere), group, none.
    text_encoder_offload: Literal["auto", "none", "group"] = "auto"
    # Prompt embeddings kept for repeated prompts (0: none); ~4 MiB of CPU memory each at 512 tokens.
    prompt_cache_size: int = Field(default=32, ge=0)
    # zlib level of stored PNGs (0-9); 4 by measurement (BENCHMARKS.md, "PNG encoding").
    png_compress_level: int = Field(default=4, ge=0, le=9)
    preview_autoencoder: Path | None = None

    # Webhooks (Standard Webhooks): the signing secret, "whsec_" + base64; unset: requests naming a
    # webhook are refused.
    webhook_secret: str = ""
    # Receivers on private, loopback or link-local addresses are refused unless allowed here: all of
    # them, or a comma-separated list of host names and networks (e.g. "hooks.internal,10.1.0.0/16").
    webhook_allow_private: bool = False
    webhook_allow_hosts: str = ""
    # One attempt's time limit, all of it (connecting, sending, the answer's status); failed attempts
    # are retried with exponential backoff (first wait, doubling, capped) until this long after the
    # first attempt, then given up.
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=60)
    webhook_backoff_s: float = Field(default=2.0, gt=0)
    webhook_backoff_max_s: float = Field(default=300.0, gt=0)
    webhook_retry_for_s: float = Field(default=3600.0, ge=0)
    # At most one progress webhook per job per this many seconds.
    webhook_progress_interval_s: float = Field(default=5.0, gt=0)
    # Deliveries one webhook worker sends at once, and at once for one API key (fairness: one key's
    # slow receivers never hold every sender).
    webhook_concurrency: int = Field(default=16, ge=1, le=1000)
    webhook_concurrency_per_key: int = Field(default=2, ge=1)

    @field_validator("webhook_secret")
    @classmethod
    def _standard_webhook_secret(cls, value: str) -> str:
        if value:
            import base64
            import binascii

            if not value.startswith("whsec_"):
                raise ValueError('must start with "whsec_" followed by base64 (e.g. from `urae-serve` or '
                                 "`python -c \"import base64,os; print('whsec_'+base64.b64encode(os.urandom(24)).decode())\"`)")
            try:
                if len(base64.b64decode(value.removeprefix("whsec_"), validate=True)) < 16:
                    raise ValueError("the key after whsec_ must be at least 16 bytes")
            except binascii.Error:
                raise ValueError("the part after whsec_ is not valid base64") from None
        return value

    @model_validator(mode="after")
    def _refuse_insecure_defaults(self) -> Settings:
        if self.key_hashes:
            return self
        if not self.dev_open_access:
            raise InsecureSettingsError(
                "no API keys configured: set URAE_API_KEYS (or URAE_API_KEY_HASHES), or for local development "
                "URAE_ENV=development and URAE_DEV_OPEN_ACCESS=true"
            )
        if self.env != "development":
            raise InsecureSettingsError(
                "URAE_DEV_OPEN_ACCESS=true is only allowed with URAE_ENV=development; configure URAE_API_KEYS"
            )
        return self

    @model_validator(mode="after")
    def _check_storage_url(self) -> Settings:
        url = self.storage_url
        if url.startswith("s3://"):
            from jobstore.storage.base import parse_s3_url

            parse_s3_url(url)
        elif "://" in url:
            raise ValueError(f"URAE_STORAGE_URL {url!r}: use a local path or s3://bucket/prefix")
        return self

    @property
    def storage_location(self) -> str:
        """URAE_STORAGE_URL, or the local URAE_STORAGE_DIR when it is unset."""
        return self.storage_url or str(self.storage_dir)

    @property
    def local_cache_dir(self) -> Path:
        return self.cache_dir or self.storage_dir / "cache"

    @property
    def key_hashes(self) -> tuple[str, ...]:
        """SHA-256 hex digests of every accepted API key; the plain keys are not kept elsewhere."""
        hashes = [hash_api_key(k.strip()) for k in self.api_keys.split(",") if k.strip()]
        hashes += [h.strip().lower() for h in self.api_key_hashes.split(",") if h.strip()]
        return tuple(dict.fromkeys([*hashes, *self.admin_hashes]))

    @property
    def admin_hashes(self) -> tuple[str, ...]:
        """SHA-256 hex digests of the admin keys (also in ``key_hashes``)."""
        hashes = [hash_api_key(k.strip()) for k in self.admin_keys.split(",") if k.strip()]
        hashes += [h.strip().lower() for h in self.admin_key_hashes.split(",") if h.strip()]
        return tuple(hashes)

    @property
    def open_access(self) -> bool:
        return not self.key_hashes and self.dev_open_access and self.env == "development"

    @property
    def max_pixels(self) -> int:
        from jobstore.contract import MAX_PIXELS

        return self.worker_max_pixels or MAX_PIXELS


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@lru_cache(maxsize=1)
class BackendSettings(Settings):
    """The settings of a process that answers no HTTP request (generation and fine-tune workers, the
    webhook sender): the API's, less its refusal to start without API keys, so such a host needs (and
    should hold) no keys."""

    @model_validator(mode="after")
    def _refuse_insecure_defaults(self) -> BackendSettings:
        return self


def _load(settings_class: type[Settings]) -> Settings:
    try:
        return settings_class()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = str(error["msg"]).removeprefix("Value error, ")
            field = ".".join(str(p) for p in error["loc"])
            problems.append(f"URAE_{field.upper()}: {message}" if field else message)
        raise SettingsError("; ".join(problems)) from None


def get_settings() -> Settings:
    """The API process's settings, read once from the environment. Raises SettingsError."""
    return _load(Settings)


def get_backend_settings() -> Settings:
    """A worker's or the webhook sender's settings (no API keys needed). Raises SettingsError."""
    return _load(BackendSettings)
