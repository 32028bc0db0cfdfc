from __future__ import annotations

import pytest

from urae.errors import InvalidSpecError
from urae.presets import PRESETS, resolve_spec, size_for_aspect
from urae.spec import MAX_PIXELS, AdapterRef, GenerationSpec


def test_table_holds_the_urae_settings():
    for name in ("2k", "4k"):
        row = PRESETS[name]
        assert (row.ntk_factor, row.proportional_attention, row.shift) == (10.0, True, 3.0)
        assert (row.steps, row.guidance, row.max_sequence_length) == (28, 3.5, 512)
    assert PRESETS["4k"].vae_decode == "tiled"
    assert PRESETS["1k"].shift is None and PRESETS["1k"].adapter is None
    for name in ("1k-schnell", "2k-schnell", "4k-schnell"):
        assert (PRESETS[name].steps, PRESETS[name].guidance, PRESETS[name].max_sequence_length) == (
            4,
            0.0,
            256,
        )


def test_schnell_models_get_the_schnell_row():
    spec = resolve_spec("a cat", "2k", schnell=True)
    assert spec.preset == "2k-schnell" and spec.steps == 4 and spec.guidance == 0.0
    assert spec.adapters == (AdapterRef("urae-2k", 1.0),)


@pytest.mark.parametrize("ratio", ["16:9", "4:3", "2:1", "1:4", "3:2"])
def test_aspect_ratios_keep_the_pixel_budget(ratio):
    width, height = size_for_aspect(4096, ratio)
    w, h = (float(x) for x in ratio.split(":"))
    assert width % 16 == 0 and height % 16 == 0
    assert abs(width / height - w / h) < 0.02
    assert abs(width * height - 4096 * 4096) / (4096 * 4096) < 0.01
    assert width * height <= MAX_PIXELS
    resolve_spec("x", "4k", aspect_ratio=ratio)  # valid at the 4K budget


def test_overrides_replace_preset_values_and_none_keeps_them():
    spec = resolve_spec("a cat", "4k", steps=12, guidance=None, width=2048, height=1024, seed=7)
    assert (spec.steps, spec.guidance, spec.width, spec.height, spec.seed) == (12, 3.5, 2048, 1024, 7)
    assert resolve_spec("a cat", "2k", preset_adapter=False).adapters == ()
    extra = resolve_spec("a cat", "2k", adapters=[AdapterRef("mine", 0.5)]).adapters
    assert [a.name for a in extra] == ["urae-2k", "mine"]


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"width": 1000}, "width"),
        ({"height": 8208}, "height"),
        ({"width": 8192, "height": 8192}, "width"),
        ({"steps": 0}, "steps"),
        ({"steps": 101}, "steps"),
        ({"guidance": -1.0}, "guidance"),
        ({"num_images": 5}, "num_images"),
        ({"seed": -3}, "seed"),
        ({"max_sequence_length": 300}, "max_sequence_length"),
        ({"vae_decode": "magic"}, "vae_decode"),
        ({"ntk_factor": float("nan")}, "ntk_factor"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(InvalidSpecError) as info:
        resolve_spec("a cat", "1k", **overrides)
    assert info.value.field == field
    assert field in str(info.value)


def test_bad_prompt_preset_and_ratio():
    with pytest.raises(InvalidSpecError, match="prompt"):
        resolve_spec("   ", "1k")
    with pytest.raises(InvalidSpecError, match="prompt"):
        resolve_spec("x" * 2001, "1k")
    with pytest.raises(InvalidSpecError, match="preset"):
        resolve_spec("a cat", "8k")
    with pytest.raises(InvalidSpecError, match="aspect_ratio"):
        resolve_spec("a cat", "1k", aspect_ratio="wide")
    with pytest.raises(InvalidSpecError, match="aspect_ratio"):
        resolve_spec("a cat", "1k", aspect_ratio="8:1")


def test_spec_round_trips_through_a_dict():
    spec = resolve_spec("a cat", "2k", adapters=[AdapterRef("mine", 0.25)])
    assert GenerationSpec.from_dict(spec.to_dict()) == spec


def test_adapter_ref_parse():
    assert AdapterRef.parse("urae-2k") == AdapterRef("urae-2k", 1.0)
    assert AdapterRef.parse("style:0.5") == AdapterRef("style", 0.5)
    assert AdapterRef.parse("/tmp/a:b.safetensors") == AdapterRef("/tmp/a:b.safetensors", 1.0)
