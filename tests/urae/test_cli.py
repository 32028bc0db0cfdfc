from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from urae.cli import main
from urae.output import read_metadata


def _urae(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "urae", *args], capture_output=True, text=True, cwd=cwd, timeout=240
    )


def test_generate_writes_images_with_metadata(tmp_path):
    out = tmp_path / "fox.webp"
    proc = _urae(
        "generate", "a red fox", "--model", "tiny", "--width", "128", "--height", "64",
        "--steps", "2", "--seed", "9", "--num-images", "2", "-o", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    paths = [tmp_path / "fox-0.webp", tmp_path / "fox-1.webp"]
    for path, seed in zip(paths, (9, 10), strict=True):
        with Image.open(path) as image:
            assert image.size == (128, 64) and image.format == "WEBP"
        meta = read_metadata(path)
        assert meta["seed"] == seed and meta["prompt"] == "a red fox" and meta["model"] == "tiny"
    assert "fox-0.webp" in proc.stdout
    # The progress bar's label names the running stage: steps that moved the bar are denoising steps.
    bars = [line for line in proc.stderr.replace("\r", "\n").splitlines() if "step/s" in line]
    moved = [line for line in bars if " 0/4" not in line and "4/4" not in line]
    assert moved and all("denoise" in line or "decode" in line for line in moved), proc.stderr
    assert not any("text_encode" in line for line in bars if " 0/4" not in line), proc.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--width", "100"], "width"),
        (["--steps", "0"], "steps"),
        (["--preset", "16k"], "preset"),
        (["--aspect-ratio", "9:1"], "aspect_ratio"),
        (["--model", "/nonexistent/flux-folder.safetensors"], "flux-folder"),
        (["--adapter", "no-such-adapter"], "no-such-adapter"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, args, needle):
    code = main(
        ["generate", "a cat", "--model", "tiny", "--steps", "1", *args, "-o", str(tmp_path / "x.png")]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("urae")]
    assert len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "x.png").exists()


def test_errors_never_show_a_traceback(tmp_path):
    proc = _urae("generate", "a cat", "--model", "tiny", "--width", "100", "-o", str(tmp_path / "x.png"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["urae generate: error: width: 100 is not a multiple of 16"]
