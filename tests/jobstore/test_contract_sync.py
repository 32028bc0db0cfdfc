"""The API's bounds and preset sizes are the library's: the two must never drift apart."""

from __future__ import annotations

import pytest

import urae.presets as presets
import urae.spec as spec
from jobstore import contract


@pytest.mark.parametrize(
    "name", ["SIZE_MULTIPLE", "MIN_SIDE", "MAX_SIDE", "MAX_PIXELS", "MAX_STEPS", "MAX_GUIDANCE", "MAX_PROMPT_CHARS",
             "MAX_IMAGES", "MAX_SEED", "TIERS", "PIXEL_LIMIT_TEXT", "DEFAULT_STRENGTH"],
)
def test_bounds_equal_the_library(name: str) -> None:
    assert getattr(contract, name) == getattr(spec, name)


def test_the_pixel_limit_message_equals_the_library() -> None:
    assert contract.pixel_limit_error(8192, 8192) == spec.pixel_limit_error(8192, 8192)


def test_aspect_ratios_and_preset_sizes_equal_the_library() -> None:
    assert contract.ASPECT_RATIOS == presets.ASPECT_RATIOS
    for preset, long_side in contract.PRESET_LONG_SIDE.items():
        assert presets.PRESETS[preset].long_side == long_side
        for ratio in contract.ASPECT_RATIOS:
            assert contract.preset_size(preset, ratio) == presets.size_for_aspect(long_side, ratio)


def test_builtin_adapter_names_equal_the_library() -> None:
    from urae.adapters import BUILTIN_ADAPTERS

    assert set(contract.BUILTIN_ADAPTERS) == set(BUILTIN_ADAPTERS)


def test_adapter_weight_bounds_equal_the_library() -> None:
    from urae.errors import InvalidSpecError

    low, high = contract.ADAPTER_WEIGHT_RANGE
    spec.GenerationSpec("p", adapters=(spec.AdapterRef("a", high),)).validate()
    with pytest.raises(InvalidSpecError):
        spec.GenerationSpec("p", adapters=(spec.AdapterRef("a", high + 0.01),)).validate()
    with pytest.raises(InvalidSpecError):
        spec.GenerationSpec("p", adapters=(spec.AdapterRef("a", low - 0.01),)).validate()


def test_service_and_jobstore_import_no_model_code() -> None:
    import subprocess
    import sys

    code = ("import sys, service.app, jobstore.contract, jobstore.jobs, jobstore.storage; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'peft', 'urae')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shipped_recipes_and_recipe_fields_equal_the_library() -> None:
    import dataclasses
    import typing

    from service.schemas import SERVER_TRAIN_FIELDS, FinetuneRecipe
    from urae.train import TrainConfig
    from urae.train.config import recipe_folders

    shipped = {p.stem for p in recipe_folders()[0].glob("*.yaml")}
    assert set(contract.SHIPPED_RECIPES) == shipped
    assert set(typing.get_args(typing.get_args(FinetuneRecipe.model_fields["recipe"].annotation)[0])) == shipped
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"recipe"}
    api_fields = set(FinetuneRecipe.model_fields) - {"recipe"}
    assert api_fields | set(SERVER_TRAIN_FIELDS) == train_fields
    assert not api_fields & set(SERVER_TRAIN_FIELDS)
