from __future__ import annotations

import math

import pytest

from urae.errors import InvalidSpecError
from urae.presets import PRESETS, resolve_spec, size_for_aspect
from urae.spec import MAX_PIXELS, AdapterRef, GenerationSpec


def test_table_holds_the_urae_settings():
    for name in ("1k", "2k", "4k"):
        row = PRESETS[name]
        assert (row.steps, row.guidance, row.max_sequence_length) == (28, 3.5, 512), name
    for name in ("2k", "4k"):
        row = PRESETS[name]
        assert (row.ntk_factor, row.proportional_attention, row.shift) == (10.0, True, 3.0), name
    for name in ("2k-schnell", "4k-schnell"):
        row = PRESETS[name]
        # schnell's own shift, as the reference runs it (its time_shift=10 is never read).
        assert (row.ntk_factor, row.proportional_attention, row.shift) == (10.0, True, 1.0), name
    assert PRESETS["4k"].vae_decode == PRESETS["4k-schnell"].vae_decode == "auto"  # exact, tiles on OOM
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


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_field_of_a_preset_row_reaches_the_spec(name):
    """What a request without overrides runs: the row's size, schedule, attention, text length and
    decode, and its adapter at full weight."""
    row = PRESETS[name]
    model = "mini" if name.endswith("-mini") else None
    spec = resolve_spec("a cat", name.split("-")[0], schnell=name.endswith("-schnell"), model=model)
    assert spec.preset == name
    assert (spec.width, spec.height) == (row.long_side, row.long_side)
    assert (spec.steps, spec.guidance, spec.max_sequence_length) == (row.steps, row.guidance, row.max_sequence_length)
    assert (spec.ntk_factor, spec.proportional_attention, spec.shift) == (
        row.ntk_factor, row.proportional_attention, row.shift)
    assert spec.vae_decode == row.vae_decode
    assert spec.adapters == ((AdapterRef(row.adapter, 1.0),) if row.adapter else ())


def test_the_default_preset_is_1k():
    spec = resolve_spec("a cat")
    assert (spec.preset, spec.width, spec.height, spec.vae_decode) == ("1k", 1024, 1024, "full")


@pytest.mark.parametrize(
    "ratio, accepted",
    [("4:1", True), ("1:4", True), ("5:1", False), ("1:5", False), ("-16:9", False), ("16:-9", False),
     ("0:1", False), ("1:0", False), ("-1:-1", False)],
)
def test_the_aspect_ratio_limits_are_the_ones_the_message_states(ratio, accepted):
    if accepted:
        width, height = size_for_aspect(1024, ratio)
        assert max(width / height, height / width) == pytest.approx(4.0, rel=0.02)
        return
    with pytest.raises(InvalidSpecError) as info:
        resolve_spec("a cat", "1k", aspect_ratio=ratio)
    assert info.value.field == "aspect_ratio"
    assert str(info.value) == f"aspect_ratio: {ratio!r} must be positive and at most 4:1"


def test_bad_names_get_messages_that_say_what_is_allowed():
    cases = [
        ({"preset": "8k"}, "preset", "preset: '8k' is not one of 1k, 2k, 4k"),
        ({"aspect_ratio": "wide"}, "aspect_ratio", "aspect_ratio: 'wide' is not of the form W:H"),
        ({"colour": "red"}, "colour", "colour: is not a generation parameter"),
    ]
    for kwargs, field, message in cases:
        with pytest.raises(InvalidSpecError) as info:
            resolve_spec("a cat", **kwargs)
        assert (info.value.field, str(info.value)) == (field, message)


def test_spec_round_trips_through_a_dict():
    spec = resolve_spec("a cat", "2k", adapters=[AdapterRef("mine", 0.25)])
    assert GenerationSpec.from_dict(spec.to_dict()) == spec


def test_adapter_ref_parse():
    assert AdapterRef.parse("urae-2k") == AdapterRef("urae-2k", 1.0)
    assert AdapterRef.parse("style:0.5") == AdapterRef("style", 0.5)
    assert AdapterRef.parse("/tmp/a:b.safetensors") == AdapterRef("/tmp/a:b.safetensors", 1.0)


# The FLUX.1 scheduler configs as published (scheduler/scheduler_config.json of each hub repo).
REAL_SCHEDULER_CONFIGS = {
    "tiny": {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
             "base_image_seq_len": 256, "max_image_seq_len": 4096, "num_train_timesteps": 1000},
    "tiny-schnell": {"shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
                     "base_image_seq_len": 256, "max_image_seq_len": 4096, "num_train_timesteps": 1000},
}


def reference_sigmas(model: str, steps: int, image_tokens: int, static_shift: float | None) -> list[float]:
    """The schedule written out from the formulas (URAE.md, FLUX's scheduler), not from our code.

    The pipeline asks for sigmas linspace(1, 1/n, n); a static shift s maps x to s x / (1 + (s - 1) x);
    the dynamic shift maps x to e^mu / (e^mu + 1/x - 1), mu linear in the image length from
    (256, 0.5) to (4096, 1.15). A preset's number replaces the config's shift and turns dynamic off.
    """
    config = REAL_SCHEDULER_CONFIGS[model]
    xs = [1.0 - i * (1.0 - 1.0 / steps) / (steps - 1) for i in range(steps)] if steps > 1 else [1.0]
    if static_shift is None and config["use_dynamic_shifting"]:
        slope = (1.15 - 0.5) / (4096 - 256)
        mu = 0.5 + slope * (image_tokens - 256)
        return [math.exp(mu) / (math.exp(mu) + (1 / x - 1)) for x in xs]
    s = config["shift"] if static_shift is None else static_shift
    return [s * x / (1 + (s - 1) * x) for x in xs]


def test_tiny_models_carry_the_real_scheduler_configs():
    from urae.tiny import build_tiny_pipeline

    for model, expected in REAL_SCHEDULER_CONFIGS.items():
        config = build_tiny_pipeline(model).scheduler.config
        assert {k: config[k] for k in expected} == expected, model


@pytest.fixture(scope="module")
def schnell_generator():
    from urae.generate import Generator

    return Generator.load("tiny-schnell", device="cpu", dtype="float32")


# mini's rows are for mini's own scheduler (tests/urae/test_mini.py), not the tiny FLUX.1 configs.
@pytest.mark.parametrize("name", sorted(n for n in PRESETS if not n.endswith("-mini")))
def test_each_preset_runs_the_reference_schedule(name, tiny_generator, schnell_generator):
    """The sigmas the pipeline actually walks through for every row, dev and schnell."""
    schnell = name.endswith("-schnell")
    generator = schnell_generator if schnell else tiny_generator
    row = PRESETS[name]
    # A small image keeps the test fast; the static schedules do not depend on the size.
    spec = resolve_spec("a cat", name, schnell=schnell, preset_adapter=False, width=96, height=64)
    assert spec.shift == row.shift
    generator.generate(spec)
    walked = [float(s) for s in generator.pipe.scheduler.sigmas[:-1]]
    expected = reference_sigmas("tiny-schnell" if schnell else "tiny", row.steps, spec.image_tokens, row.shift)
    assert walked == pytest.approx(expected, abs=1e-5)
    if schnell:
        assert walked == pytest.approx([1.0, 0.75, 0.5, 0.25], abs=1e-6)
    elif name != "1k":
        assert walked[-1] < 0.15  # the dev schedule at 2K/4K reaches low noise


def test_the_pixel_limit_is_the_product_the_message_states():
    """A user predicts acceptance from the message: width x height <= the stated number, no more."""
    import dataclasses

    base = resolve_spec("a cat", "1k")
    assert MAX_PIXELS == 4096 * 4160 == 17_039_360
    dataclasses.replace(base, width=4096, height=4160).validate()  # exactly the limit
    with pytest.raises(InvalidSpecError) as err:
        dataclasses.replace(base, width=4096, height=4176).validate()
    message = str(err.value)
    assert "4096x4176 is 17,104,896 pixels" in message and "17,039,360 pixels" in message
    assert "4096x4160" in message
    with pytest.raises(InvalidSpecError) as big:
        dataclasses.replace(base, width=8192, height=8192).validate()
    assert "8192x8192 is 67,108,864 pixels; the maximum is 17,039,360 pixels" in str(big.value)


def test_a_model_with_its_own_scale_gets_its_own_rows():
    # mini is trained at 128 px: its 1k/2k/4k are 128/256/512 px with its own URAE adapters.
    assert [resolve_spec("x", size, model="mini").width for size in ("1k", "2k", "4k")] == [128, 256, 512]
    assert resolve_spec("x", "2k-mini").preset == "2k"
    assert resolve_spec("x", "2k", model="mini").preset == "2k-mini"
    assert resolve_spec("x", "4k", model="black-forest-labs/FLUX.1-dev").width == 4096
