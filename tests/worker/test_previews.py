"""Live previews: the library's latent -> RGB rendering, and preview events from a real worker via SSE."""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import wait_for_status

# -- the library ----------------------------------------------------------------------------------
# FLUX.1's latent -> RGB factors as ComfyUI publishes them (comfy/latent_formats.py, class Flux):
# one row per latent channel, columns R, G, B. Written out here, not imported, so that a change to the
# library's copy shows.
PUBLISHED_FLUX_FACTORS = [
    [-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433], [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115], [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180], [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499], [-0.1262, -0.0982, -0.0778],
]
PUBLISHED_FLUX_BIAS = [-0.0329, -0.0718, -0.0851]


def test_flux_map_is_the_published_16x3_map_with_bias() -> None:
    from urae.previews import flux_latent_rgb_map, latents_to_preview

    rgb_map = flux_latent_rgb_map()
    assert rgb_map.factors.shape == (16, 3) and rgb_map.bias.shape == (3,)
    assert torch.allclose(rgb_map.factors, torch.tensor(PUBLISHED_FLUX_FACTORS), atol=1e-6)
    assert torch.allclose(rgb_map.bias, torch.tensor(PUBLISHED_FLUX_BIAS), atol=1e-6)
    # A zero latent is the bias alone: (bias + 1) * 127.5 per channel.
    pixels = latents_to_preview(torch.zeros(16, 32, 64), rgb_map, 512, 256)
    assert pixels.shape == (128, 256, 3) and pixels.dtype == np.uint8
    bias = np.array(PUBLISHED_FLUX_BIAS)
    assert np.abs(pixels.reshape(-1, 3) - np.round((bias + 1) * 127.5)).max() <= 1
    # Latent channel c alone, at 6: the preview's colour is that channel's row (channels are rows,
    # not columns, and each row goes with its own channel).
    for channel, row in enumerate(PUBLISHED_FLUX_FACTORS):
        latents = torch.zeros(16, 4, 4)
        latents[channel] = 6.0
        colour = latents_to_preview(latents, rgb_map, 32, 32)[0, 0].astype(float)
        expected = np.round((6.0 * np.array(row) + bias + 1) * 127.5)
        assert np.abs(colour - expected).max() <= 1, (channel, colour, expected)


def test_preview_size_long_side_and_no_upscaling() -> None:
    from urae.previews import preview_size

    assert preview_size(4096, 2304) == (256, 144)
    assert preview_size(2048, 2048) == (256, 256)
    assert preview_size(128, 64) == (128, 64)


def test_unpacking_matches_the_pipeline() -> None:
    from diffusers import FluxPipeline

    from urae.previews import unpack_latents

    packed = torch.randn(1, (96 // 16) * (160 // 16), 64)
    ours = unpack_latents(packed, 96, 160, 8)
    theirs = FluxPipeline._unpack_latents(packed, 96, 160, 8)
    assert torch.equal(ours, theirs)  # a pure reshape of the same tensor: equal by construction


@pytest.fixture(scope="module")
def tiny_pipe() -> Any:
    from urae.tiny import build_tiny_pipeline

    return build_tiny_pipeline("tiny")


def test_tiny_model_map_fits_its_own_vae(tiny_pipe: Any) -> None:
    """The fitted map is deterministic and, on latents it was not fitted on, its colours go with the
    VAE's decode in every channel. (The tiny VAE has random weights and is mostly non-linear: the
    fit explains ~6% of its colour variance; a wrong or transposed map gives no correlation.)"""
    import torch.nn.functional as F

    from urae.previews import fit_latent_rgb_map, latent_rgb_map_for, latents_to_preview

    vae = tiny_pipe.vae
    rgb_map = latent_rgb_map_for(vae)
    assert rgb_map.channels == vae.config.latent_channels == 4 and "fit" in rgb_map.source
    again = fit_latent_rgb_map(vae)
    assert torch.allclose(rgb_map.factors, again.factors, atol=1e-5)

    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(123))  # not the fit's seed
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1)
    truth = F.avg_pool2d(decoded, 8)[0]  # the decode averaged to the latent grid
    preview = latents_to_preview(latents, rgb_map, 256, 256, max_side=32)
    predicted = torch.from_numpy(preview).permute(2, 0, 1).float() / 127.5 - 1
    for channel in range(3):
        correlation = torch.corrcoef(torch.stack([predicted[channel].flatten(), truth[channel].flatten()]))[0, 1]
        assert correlation > 0.1, (channel, correlation)
    assert (predicted - truth).pow(2).mean() < (truth - truth.mean(dim=(1, 2), keepdim=True)).pow(2).mean()


def test_renderer_runs_off_the_loop_and_drops_while_busy() -> None:
    import threading

    from urae.previews import PreviewRenderer

    release = threading.Event()
    frames: list[Any] = []

    def slow_render(latents: torch.Tensor, width: int, height: int) -> np.ndarray:
        release.wait(5)
        return np.zeros((height // 8, width // 8, 3), np.uint8)

    renderer = PreviewRenderer(slow_render, frames.append, 64, 64)
    packed = torch.randn(1, 16, 16)
    started = time.perf_counter()
    assert renderer.submit(1, 4, 0, packed) is True
    assert renderer.submit(2, 4, 0, packed) is False  # the first is still rendering: dropped
    assert time.perf_counter() - started < 0.5  # submit never waited for the render
    release.set()
    renderer.close()
    assert [f.step for f in frames] == [1] and renderer.dropped == 1


def test_generator_previews_every_n_steps(tiny_pipe: Any) -> None:
    import threading

    from urae.generate import Generator, Progress
    from urae.spec import GenerationSpec

    generator = Generator(tiny_pipe, "tiny")
    frames: list[Any] = []
    arrived = threading.Condition()

    def sink(frame: Any) -> None:
        with arrived:
            frames.append(frame)
            arrived.notify_all()

    def pace(every: int) -> Any:
        # The renderer drops a preview while one is in flight; so that every preview due is rendered
        # here, each step waits (bounded) for the previews of the steps before it.
        def wait(progress: Progress) -> None:
            if progress.stage == "denoise" and progress.step > 0:
                with arrived:
                    arrived.wait_for(lambda: len(frames) >= (progress.step - 1) // every, timeout=20)
        return wait

    spec = GenerationSpec(prompt="a fox", width=256, height=128, steps=6, seed=3)
    with_previews = generator.generate(spec, on_progress=pace(2), on_preview=sink, preview_every=2)
    assert [f.step for f in frames] == [2, 4, 6] and all(f.total == 6 for f in frames)
    assert all(f.pixels.shape == (128, 256, 3) for f in frames)
    frames.clear()
    generator.generate(spec, on_progress=pace(3), on_preview=sink, preview_every=3)
    assert [f.step for f in frames] == [3, 6]
    # Previews do not change the image.
    plain = generator.generate(spec)
    a, b = np.asarray(with_previews.images[0]), np.asarray(plain.images[0])
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_tiny_autoencoder_from_a_local_folder(tiny_pipe: Any, tmp_path: Any) -> None:
    """A saved AutoencoderTiny (here a random one with the tiny model's 4 channels) decodes the previews."""
    from diffusers import AutoencoderTiny

    from urae.generate import Generator
    from urae.spec import GenerationSpec

    AutoencoderTiny(latent_channels=4, encoder_block_out_channels=(8, 8, 8, 8),
                    decoder_block_out_channels=(8, 8, 8, 8), num_encoder_blocks=(1, 1, 1, 1),
                    num_decoder_blocks=(1, 1, 1, 1)).save_pretrained(tmp_path / "taef1-test")
    spec = GenerationSpec(prompt="a fox", width=128, height=64, steps=2, seed=1)
    decoded: list[Any] = []
    Generator(tiny_pipe, "tiny", preview_autoencoder=tmp_path / "taef1-test").generate(
        spec, on_preview=decoded.append, preview_every=2)
    linear: list[Any] = []
    Generator(tiny_pipe, "tiny").generate(spec, on_preview=linear.append, preview_every=2)
    assert decoded[-1].pixels.shape == linear[-1].pixels.shape == (64, 128, 3)
    # Same latents, another renderer: the autoencoder's image, not the linear map's.
    assert np.abs(decoded[-1].pixels.astype(int) - linear[-1].pixels.astype(int)).mean() > 5


# -- through the worker and the API ---------------------------------------------------------------
@pytest.fixture(scope="module")
def worker(start_worker: Any) -> Any:
    return start_worker("gen-previews", "--queues", "generate")


def live_events(http: Any, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    name = ""
    with http.stream("GET", f"/jobs/{job_id}/events", timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def decode_preview(event: dict[str, Any]) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert event["image"].startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(event["image"].removeprefix(prefix))))
    image.load()
    assert image.format == "JPEG"
    return image


def test_event_stream_carries_jpeg_previews(http: Any, worker: Any) -> None:
    body = {"prompt": "a lighthouse", "width": 512, "height": 256, "steps": 8, "seed": 5, "preview_every": 2}
    job_id = http.post("/generate", json=body).json()["id"]
    events = live_events(http, job_id)
    previews = [e for name, e in events if name == "preview"]
    assert previews, [name for name, _ in events]
    for event in previews:
        assert event["step"] % 2 == 0 and event["total"] == 8
        assert (event["width"], event["height"]) == (256, 128)
        assert decode_preview(event).size == (256, 128)
        assert len(event["image"]) < 64 * 1024  # a few KB, not an image's worth
    assert [e["step"] for e in previews] == sorted({e["step"] for e in previews})
    assert events[-1][1]["status"] == "finished"

    # A replay (or a late client) gets the latest preview once, not every one published.
    replay = [e for name, e in live_events(http, job_id) if name == "preview"]
    assert len(replay) == 1 and replay[0]["step"] == previews[-1]["step"]


def test_without_a_cadence_a_short_run_still_shows_the_image_forming(http: Any, worker: Any, redis_url: str) -> None:
    """The playground's CPU defaults (4 steps) with URAE_PREVIEW_EVERY=4: previews before the last step,
    not only one right before the final image."""
    import redis

    from jobstore.contract import default_preview_every, job_events_key

    assert [default_preview_every(4, steps) for steps in (1, 4, 8, 12, 28)] == [1, 1, 2, 3, 4]
    assert default_preview_every(0, 28) == 0  # off stays off
    job_id = http.post("/generate", json={"prompt": "x", "width": 64, "height": 64, "steps": 4, "seed": 1}).json()["id"]
    assert wait_for_status(http, job_id)["status"] == "finished"
    # What the worker published, read from the job's event stream (a live client is sent only the newest
    # preview when it falls behind, so what it sees depends on the machine's load; this does not). The
    # first preview is always rendered (later ones may be dropped while one renders): step 1 of 4.
    conn = redis.Redis.from_url(redis_url)
    markers = [json.loads(fields[b"data"]) for _, fields in conn.xrange(job_events_key(job_id))]
    conn.close()
    published = [m for m in markers if m.get("type") == "preview"]
    assert published and published[0]["step"] == 1 and all(m["total"] == 4 for m in published), markers
    # And a client is sent the latest of them.
    replay = [e for name, e in live_events(http, job_id) if name == "preview"]
    assert len(replay) == 1 and replay[0]["step"] == published[-1]["step"] and replay[0]["total"] == 4


def test_previews_off_by_request(http: Any, worker: Any) -> None:
    off = http.post("/generate", json={"prompt": "x", "width": 64, "height": 64, "steps": 4, "seed": 1,
                                       "preview_every": 0}).json()["id"]
    assert not [n for n, _ in live_events(http, off) if n == "preview"]
    assert wait_for_status(http, off)["status"] == "finished"
    assert http.post("/generate", json={"prompt": "x", "preview_every": -1}).status_code == 422
