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


def test_generate_without_a_seed_picks_a_random_one_and_prints_it(tmp_path, capsys):
    """Like the API: no --seed means a fresh seed per run (not 0 every time), reported so it can be repeated."""
    seeds = []
    for run in range(2):
        out = tmp_path / f"run{run}.png"
        code = main(["generate", "a red fox", "--model", "tiny", "--width", "64", "--height", "64",
                     "--steps", "1", "-o", str(out)])
        printed = capsys.readouterr().out
        assert code == 0
        seed = int(printed.split("seed=")[1].split()[0])
        assert read_metadata(out)["seed"] == seed
        seeds.append(seed)
    assert seeds[0] != seeds[1] and 0 not in seeds, seeds
    # The printed seed gives the same image again.
    again = tmp_path / "again.png"
    assert main(["generate", "a red fox", "--model", "tiny", "--width", "64", "--height", "64", "--steps", "1",
                 "--seed", str(seeds[1]), "-o", str(again)]) == 0
    with Image.open(tmp_path / "run1.png") as first, Image.open(again) as second:
        diff = max(abs(a - b) for a, b in zip(first.tobytes(), second.tobytes(), strict=True))
    assert diff <= 1


def test_generate_from_an_image_and_refine_a_draft(tmp_path, capsys):
    """`urae generate --image` starts from a picture; `urae refine` makes a draft's picture at a larger size
    with the draft's prompt, seed and adapters (its own URAE adapter replaced by the target preset's)."""
    import numpy as np

    draft = tmp_path / "draft.png"
    assert main(["generate", "two red circles on a white background", "--model", "mini", "--seed", "5",
                 "--steps", "4", "-o", str(draft)]) == 0
    refined = tmp_path / "draft-refined.png"
    assert main(["refine", str(draft), "--preset", "2k", "--steps", "4", "--strength", "0.5"]) == 0
    assert str(refined) in capsys.readouterr().out
    meta = read_metadata(refined)
    assert (meta["prompt"], meta["seed"], meta["model"]) == ("two red circles on a white background", 5, "mini")
    assert [a["name"] for a in meta["adapters"]] == ["urae-2k"] and meta["preset"] == "2k-mini"
    assert meta["strength"] == 0.5 and meta["input_image"]["width"] == 128
    with Image.open(refined) as big, Image.open(draft) as small:
        assert big.size == (256, 256)
        # The same picture: the refined image, scaled down, follows the draft.
        a = np.asarray(big.convert("RGB").resize(small.size, Image.Resampling.BOX), dtype=float).ravel()
        b = np.asarray(small.convert("RGB"), dtype=float).ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.5

    # Any picture with a prompt: the output has the requested size and says what it started from.
    out = tmp_path / "from-image.png"
    Image.new("RGB", (300, 200), (0, 90, 200)).save(tmp_path / "blue.jpg")
    assert main(["generate", "a red fox", "--model", "tiny", "--width", "64", "--height", "64", "--steps", "2",
                 "--seed", "1", "--image", str(tmp_path / "blue.jpg"), "-o", str(out)]) == 0
    meta = read_metadata(out)
    assert meta["strength"] == 0.45 and meta["input_image"]["width"] == 300


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--strength", "0.5"], "strength: applies to an input image"),
        (["--image", "{dir}/missing.png"], "missing.png: no such file"),
        (["--image", "{dir}/text.png"], "not a readable image"),
        (["--image", "{dir}/ok.png", "--strength", "0"], "strength"),
        (["--image", "{dir}/ok.png", "--strength", "1.5"], "strength"),
        (["--image", "{dir}/big.png"], "more than 67,108,864 pixels"),
        (["--image", "{dir}/ok.gif"], "a GIF image"),
    ],
)
def test_bad_input_images_are_one_line_and_exit_code_2(tmp_path, capsys, args, needle):
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.gif")
    Image.new("1", (8193, 8193)).save(tmp_path / "big.png")  # one bit per pixel: small on disk
    args = [a.replace("{dir}", str(tmp_path)) for a in args]
    code = main(["generate", "a cat", "--model", "tiny", "--steps", "1", *args, "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("urae")]
    assert len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "x.png").exists()


def test_refine_needs_a_draft_with_a_record(tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "plain.png")
    assert main(["refine", str(tmp_path / "plain.png"), "--model", "tiny"]) == 2
    assert "holds no generation record" in capsys.readouterr().err
    assert main(["refine", str(tmp_path / "none.png"), "--model", "tiny"]) == 2
    assert "none.png: no such file" in capsys.readouterr().err
    assert not list(tmp_path.glob("*refined*"))
