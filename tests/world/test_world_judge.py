"""The world and its judge: captions round-trip, renderings are exact at any size, and the judge
passes rendered images and fails corrupted ones (duplicated, fragmented, wrong colour, blurred)."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from urae.world.judge import judge
from urae.world.render import render
from urae.world.scene import (
    COLOURS,
    CaptionError,
    SceneObject,
    parse_caption,
    sample_scene,
    scene_for_caption,
)
from urae.world.teacher import WorldTeacher

SEEDS = range(40)


def test_captions_round_trip_and_other_text_is_refused() -> None:
    for seed in SEEDS:
        scene = sample_scene(seed)
        expected = parse_caption(scene.caption)
        assert expected.groups == scene.groups and expected.background == scene.background
        assert 1 <= expected.total <= 4
    assert parse_caption("two red circles and a blue square in a row on a striped background").total == 3
    for bad in ("a red fox", "five red circles on a white background", "a purple circle on a white background",
                "a red circle on a plaid background"):
        with pytest.raises(CaptionError):
            parse_caption(bad)


@pytest.mark.parametrize("size", [128, 256, 512])
def test_rendered_scenes_are_judged_right_and_sharp_at_every_size(size: int) -> None:
    for seed in SEEDS:
        scene = sample_scene(seed)
        verdict = judge(render(scene, size), scene.caption)
        assert verdict.correct and verdict.sharp and verdict.background_correct, (scene.caption, verdict)
        assert not verdict.duplicated and not verdict.fragmented


def test_a_larger_rendering_is_the_same_picture_with_more_detail_not_an_upscale() -> None:
    scene = sample_scene(7)
    small = np.asarray(render(scene, 128), dtype=np.float64)
    large = np.asarray(render(scene, 512), dtype=np.float64)
    # Averaging 4x4 blocks of the large rendering gives the small one up to the antialiasing.
    pooled = large.reshape(128, 4, 128, 4, 3).mean(axis=(1, 3))
    assert np.abs(pooled - small).mean() < 1.0
    upscaled = Image.fromarray(small.astype(np.uint8)).resize((512, 512), Image.Resampling.BICUBIC)
    assert judge(render(scene, 512), scene.caption).edge_width < judge(upscaled, scene.caption).edge_width


def test_a_caption_becomes_a_scene_that_shows_it() -> None:
    caption = "three yellow triangles and a green circle in a column on a checkered background"
    for seed in range(10):
        scene = scene_for_caption(caption, seed)
        assert scene.caption == caption
        assert judge(render(scene, 256), caption).correct


def _extra_copy(scene_seed: int) -> tuple[Image.Image, str]:
    """A scene with one object more than its caption says (placed where nothing is)."""
    for seed in range(scene_seed, scene_seed + 200):
        scene = sample_scene(seed)
        if len(scene.objects) > 3:
            continue
        first = scene.objects[0]
        for cx, cy in ((0.15, 0.15), (0.85, 0.85), (0.15, 0.85), (0.85, 0.15), (0.5, 0.5)):
            clear = all(max(abs(cx - o.cx), abs(cy - o.cy)) > (o.size + first.size) / 2 + 0.02 for o in scene.objects)
            if clear and first.size / 2 < min(cx, cy, 1 - cx, 1 - cy):
                copy = dataclasses.replace(first, cx=cx, cy=cy)
                bigger = dataclasses.replace(scene, objects=(*scene.objects, copy))
                return render(bigger, 256), scene.caption
    raise AssertionError("no scene with room for a copy")


def test_a_duplicated_object_is_judged_wrong() -> None:
    for start in (0, 300, 600):
        image, caption = _extra_copy(start)
        verdict = judge(image, caption)
        assert verdict.duplicated and not verdict.counts_correct and not verdict.correct


def test_the_high_resolution_failure_a_tiled_picture_is_duplicated() -> None:
    scene = sample_scene(3)
    tile = render(scene, 128)
    tiled = Image.new("RGB", (256, 256))
    for x in (0, 128):
        for y in (0, 128):
            tiled.paste(tile, (x, y))
    verdict = judge(tiled, scene.caption)
    assert verdict.duplicated and not verdict.correct


def test_a_fragmented_object_is_judged_wrong() -> None:
    for seed in SEEDS:
        scene = sample_scene(seed)
        image = render(scene, 256)
        draw = ImageDraw.Draw(image)
        background = image.getpixel((0, 0))
        obj = scene.objects[0]
        # Crack the object into four with background-coloured lines through its centre.
        cx, cy, half = obj.cx * 256, obj.cy * 256, obj.size * 256 / 2
        draw.line([(cx - half, cy), (cx + half, cy)], fill=background, width=1)
        draw.line([(cx, cy - half), (cx, cy + half)], fill=background, width=1)
        verdict = judge(image, scene.caption)
        assert verdict.fragmented and not verdict.correct, scene.caption


def test_a_wrong_colour_is_judged_wrong() -> None:
    for seed in SEEDS:
        scene = sample_scene(seed)
        colours = {o.colour for o in scene.objects}
        other = next(c for c in COLOURS if c not in colours)
        first = scene.objects[0]
        recoloured = [dataclasses.replace(o, colour=other) if o.colour == first.colour else o for o in scene.objects]
        image = render(dataclasses.replace(scene, objects=tuple(recoloured)), 256)
        verdict = judge(image, scene.caption)
        assert not verdict.colours_correct and not verdict.correct, scene.caption


def test_a_blurred_image_is_judged_not_sharp() -> None:
    for seed in SEEDS:
        scene = sample_scene(seed)
        blurred = render(scene, 256).filter(ImageFilter.GaussianBlur(3))
        assert not judge(blurred, scene.caption).sharp, scene.caption


def test_a_wrong_shape_is_judged_wrong() -> None:
    scene = sample_scene(2)
    shapes = {o.shape for o in scene.objects}
    other = next(s for s in ("circle", "square", "triangle") if s not in shapes)
    swapped = tuple(SceneObject(other, o.colour, o.cx, o.cy, o.size) for o in scene.objects)
    verdict = judge(render(dataclasses.replace(scene, objects=swapped), 256), scene.caption)
    assert not verdict.counts_correct and not verdict.correct


def test_the_teacher_draws_captions_through_the_synth_protocol(tmp_path) -> None:
    from urae.data.dataset import scan_dataset
    from urae.synth import synthesize

    captions = [sample_scene(seed).caption for seed in range(4)]
    report = synthesize(captions, tmp_path, WorldTeacher(256), seed=5, concurrency=1)
    assert report.done == [0, 1, 2, 3]
    items = scan_dataset(tmp_path)
    assert [item.prompt for item in items] == captions
    for item in items:
        assert (item.width, item.height) == (256, 256)
        assert judge(Image.open(item.image), item.prompt).correct
    failed = synthesize(["a red fox"], tmp_path / "bad", WorldTeacher(256))
    assert "not a world caption" in failed.failed[0]
    # The same caption and seed draw the same picture.
    again = WorldTeacher(256).generate(captions[0], 5).data
    assert Image.open(io.BytesIO(again)).tobytes() == Image.open(items[0].image).tobytes()


def test_a_wrong_background_is_judged_wrong() -> None:
    for seed in range(12):
        scene = sample_scene(seed)
        for other in ("white", "black", "striped", "checkered"):
            if other != scene.background:
                verdict = judge(render(dataclasses.replace(scene, background=other), 256), scene.caption)
                assert verdict.background == other and not verdict.background_correct
