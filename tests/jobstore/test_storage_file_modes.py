"""Objects the local storage writes (images, adapters, uploads) follow the umask of the writing process."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from jobstore.storage.local import LocalStorage


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o027])
def test_put_and_temp_path_follow_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        storage = LocalStorage(tmp_path / "root")
        storage.put("outputs/job/0.png", b"png")
        tmp = storage.temp_path("adapters/a/1.safetensors")
        tmp.write_bytes(b"x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(storage.path("outputs/job/0.png").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(tmp.stat().st_mode) == 0o666 & ~umask
