"""A prompt longer than what CLIP (77 tokens) or T5 (max_sequence_length) reads is reported, not cut silently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from urae.presets import resolve_spec

LONG = " ".join(f"a lighthouse number {i} on a cliff" for i in range(40))


def small(prompt: str, max_sequence_length: int = 64):
    return resolve_spec(prompt, "1k", width=64, height=64, steps=1, max_sequence_length=max_sequence_length)


def test_a_short_prompt_has_no_warnings(tiny_generator) -> None:
    assert tiny_generator.generate(small("a cat")).warnings == []


def test_a_long_prompt_reports_what_each_encoder_cuts(tiny_generator) -> None:
    result = tiny_generator.generate(small(LONG))
    clip = len(tiny_generator.pipe.tokenizer(LONG, truncation=False)["input_ids"])
    t5 = len(tiny_generator.pipe.tokenizer_2(LONG, truncation=False)["input_ids"])
    assert clip > 77 and t5 > 64
    assert result.warnings == [
        f"the prompt is {clip} CLIP tokens; CLIP reads only the first 77 (its pooled embedding ignores the rest)",
        f"the prompt is {t5} T5 tokens; only the first 64 are used (max_sequence_length 64): "
        "the rest of the prompt is ignored",
    ]


def test_only_clip_cuts_when_t5_has_room(tiny_generator) -> None:
    prompt = " ".join(["cat"] * 40)
    clip = len(tiny_generator.pipe.tokenizer(prompt, truncation=False)["input_ids"])
    t5 = len(tiny_generator.pipe.tokenizer_2(prompt, truncation=False)["input_ids"])
    assert clip > 77 and t5 <= 512
    warnings = tiny_generator.generate(small(prompt, max_sequence_length=512)).warnings
    assert len(warnings) == 1 and "CLIP" in warnings[0]


def test_the_cli_prints_the_warning_to_stderr(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "urae", "generate", LONG, "--model", "tiny", "--width", "64", "--height", "64",
         "--steps", "1", "-o", str(tmp_path / "long.png")],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "urae generate: warning: the prompt is" in result.stderr and "CLIP reads only the first 77" in result.stderr
    assert "warning" not in result.stdout and (tmp_path / "long.png").is_file()
