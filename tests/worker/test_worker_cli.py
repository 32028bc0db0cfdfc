"""The worker's command line refuses what it cannot serve with one readable line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--queues", "generat"], "unknown queue 'generat'"),
        (["--queues", "generate,finetune"], "needs its own worker process"),
        (["--queues", ","], "names no queue"),
    ],
)
def test_bad_queue_flags_are_refused(args: list[str], words: str) -> None:
    env = {**os.environ, "URAE_API_KEYS": "k"}
    result = subprocess.run([sys.executable, "-m", "worker", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert words in result.stderr
    assert "Traceback" not in result.stderr
