"""GET /config: what the live workers serve, and request settings that give a first image quickly.

The playground (and any client) starts from these instead of fixed defaults: 2K at 28 steps takes
seconds on a GPU but minutes on a CPU, where 512 px at 4 steps answers in seconds.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from jobstore.contract import INPUT_IMAGE_TYPES, MAX_INPUT_IMAGE_PIXELS, TIERS, JobKind
from service.admission import serving_workers
from service.deps import ApiKeyDep, RedisDep, SettingsDep
from service.json_bodies import BoundedJsonRoute

router = APIRouter(route_class=BoundedJsonRoute, tags=["health"])



class Suggested(BaseModel):
    """Fields for POST /generate; those absent take the API's defaults."""

    preset: str | None = None
    aspect_ratio: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    reason: str


class InputImageLimits(BaseModel):
    """What POST /generate and refine accept as an input image (``image``), checked before decoding."""

    max_bytes: int
    max_pixels: int
    content_types: list[str]


class ServerConfig(BaseModel):
    model: str
    devices: list[str]
    live_workers: int
    max_pixels: int | None
    tiers: list[str]
    suggested: Suggested
    input_image: InputImageLimits


def _device_kind(device: str | None) -> str:
    return "cpu" if str(device or "").startswith("cpu") else "gpu"


# Models whose presets are scaled to their own training size (urae.presets.PRESET_FAMILIES): their
# 1k preset is their base resolution, which a CPU draws in about a second at the preset's own steps.
SMALL_MODELS = ("mini",)


def suggest(devices: list[str], model: str | None = None) -> Suggested:
    """Settings for a quick first image on the slowest live device (the job may land on it)."""
    if model in SMALL_MODELS:
        # Smaller sizes or fewer steps would only draw worse; larger ones are its 2x / 4x presets.
        return Suggested(preset="1k", aspect_ratio="1:1", reason=f"{model}: its base resolution at its own steps")
    if not devices or any(_device_kind(d) == "cpu" for d in devices):
        where = "the workers run on a CPU" if devices else "no worker is live; assumed a CPU"
        # A first image in seconds on a CPU (any model): small and few steps.
        return Suggested(width=512, height=512, steps=4,
                         reason=f"{where}: 512 px at 4 steps gives a first image in seconds")
    # On GPUs the 2K preset (URAE's 2K adapter, the preset's steps) is the product's point.
    return Suggested(preset="2k", aspect_ratio="1:1", reason="the workers run on GPUs: the 2K preset at its own steps")


@router.get("/config", response_model=ServerConfig)
def server_config(_: ApiKeyDep, settings: SettingsDep, conn: RedisDep) -> ServerConfig:
    """The served model, the live workers' devices, tiers and size limit, suggested settings, input limits."""
    workers: list[dict[str, Any]] = serving_workers(conn, settings, JobKind.GENERATE)
    devices = sorted({str(w.get("device") or "unknown") for w in workers})
    limits = [int(w["max_pixels"]) for w in workers if w.get("max_pixels")]
    return ServerConfig(
        model=settings.model, devices=devices, live_workers=len(workers), max_pixels=max(limits) if limits else None,
        tiers=sorted({t for w in workers for t in w.get("tiers", ["quality"])}, key=TIERS.index),
        suggested=suggest(devices, settings.model),
        input_image=InputImageLimits(max_bytes=settings.max_input_image_bytes, max_pixels=MAX_INPUT_IMAGE_PIXELS,
                                     content_types=sorted(INPUT_IMAGE_TYPES)),
    )
