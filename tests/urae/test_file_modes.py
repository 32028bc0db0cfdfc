"""Files the CLI and the library write atomically get the mode the umask asks for, not mkstemp's 0600."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from urae.adapters.formats import write_atomically
from urae.file_modes import current_umask
from urae.output import save_image


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_umask_is_read_without_changing_it(umask: int) -> None:
    assert current_umask() == umask
    assert current_umask() == umask


def test_saved_images_follow_the_umask(umask: int, tmp_path: Path) -> None:
    path = save_image(Image.new("RGB", (16, 16)), {"prompt": "x"}, tmp_path / "out.png")
    assert mode(path) == 0o666 & ~umask
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    assert mode(path) == mode(plain)  # the same as any file the process writes


def test_atomic_writes_follow_the_umask(umask: int, tmp_path: Path) -> None:
    path = write_atomically(tmp_path / "adapter.safetensors", lambda tmp: Path(tmp).write_bytes(b"data"))
    assert mode(path) == 0o666 & ~umask


def test_the_cli_writes_images_readable_by_the_group(tmp_path: Path) -> None:
    """`urae generate` under umask 022 writes a 0644 file (mkstemp alone would give 0600)."""
    result = subprocess.run(
        [sys.executable, "-m", "urae", "generate", "a cat", "--model", "tiny", "--width", "64", "--height", "64",
         "--steps", "1", "-o", str(tmp_path / "cat.png")],
        capture_output=True, text=True, timeout=180, preexec_fn=lambda: os.umask(0o022),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert mode(tmp_path / "cat.png") == 0o644


def test_the_library_and_jobstore_copies_are_the_same() -> None:
    root = Path(__file__).resolve().parents[2]
    library = (root / "urae" / "file_modes.py").read_text()
    shared = (root / "jobstore" / "file_modes.py").read_text()
    body = library[library.index("from __future__"):]
    assert shared[shared.index("from __future__"):] == body
