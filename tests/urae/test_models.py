from __future__ import annotations

import pytest
import torch

from tests.pixels import max_pixel_diff
from urae.errors import ModelLoadError
from urae.generate import Generator
from urae.models import is_schnell, load_pipeline, parse_dtype
from urae.presets import resolve_spec


def test_a_saved_diffusers_folder_loads_offline_and_gives_the_same_pixels(tmp_path):
    built = load_pipeline("tiny", device="cpu", dtype="float32")
    built.save_pretrained(tmp_path / "tiny-flux")
    loaded = load_pipeline(str(tmp_path / "tiny-flux"), device="cpu", dtype="float32")
    spec = resolve_spec("a harbour at night", "1k", width=64, height=64, steps=2, seed=4)
    a = Generator(built, "tiny").generate(spec).images[0]
    b = Generator(loaded, str(tmp_path / "tiny-flux")).generate(spec).images[0]
    # Same weights, but a second load may pick other CPU kernels: equal to within one uint8 step.
    assert max_pixel_diff(a, b) <= 1


def test_the_caller_chooses_the_dtype_and_the_flavour_is_detected():
    pipe = load_pipeline("tiny-schnell", device="cpu", dtype="bfloat16")
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert is_schnell(pipe) and not is_schnell(load_pipeline("tiny", dtype="float32"))


def test_bad_model_arguments_are_specific_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="dtype"):
        parse_dtype("float8")
    with pytest.raises(ModelLoadError, match="offload"):
        load_pipeline("tiny", offload="disk")
    with pytest.raises(ModelLoadError, match="empty-folder"):
        (tmp_path / "empty-folder").mkdir()
        load_pipeline(str(tmp_path / "empty-folder"), dtype="float32")
