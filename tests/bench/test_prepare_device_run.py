"""The preparation of a device run checks the wheels it carries (for the device's CPython 3.12 on
manylinux x86_64, one version each, the lock's versions) and prints the commands to run. Checked here
on wheel files named as the index names them (``--check`` downloads nothing)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOOD = [
    "diffusers-0.42.1-py3-none-any.whl",
    "torchao-0.18.0-cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    "sageattention-1.0.6-py3-none-any.whl",
]


def _check(folder: Path, names: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return subprocess.run(
        ["bash", "bench/prepare_device_run.sh", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "WHEELHOUSE": str(folder), "DIFFUSERS_VERSION": "0.42.1", "TORCHAO_VERSION": "0.18.0",
             "SAGEATTENTION_VERSION": "1.0.6", **env},
    )


def test_wheels_for_the_device_pass_and_the_commands_are_printed(tmp_path: Path) -> None:
    proc = _check(tmp_path / "whl", GOOD)
    assert proc.returncode == 0, proc.stderr
    assert "diffusers 0.42.1, sageattention 1.0.6, torchao 0.18.0" in proc.stdout
    assert 'command: bash bench/device_check.sh part1     carry: [".whl"]   timeout_s: 450' in proc.stdout
    assert 'command: bash bench/device_check.sh part2     carry: [".whl"]   timeout_s: 330' in proc.stdout


def test_a_wheel_for_another_python_or_a_second_version_is_refused(tmp_path: Path) -> None:
    wrong_python = [GOOD[0], "torchao-0.18.0-cp311-cp311-manylinux_2_28_x86_64.whl", GOOD[2]]
    proc = _check(tmp_path / "a", wrong_python)
    assert proc.returncode == 1 and "not for CPython 3.12 on manylinux x86_64" in proc.stderr
    two_versions = [*GOOD, "diffusers-0.41.0-py3-none-any.whl"]
    proc = _check(tmp_path / "b", two_versions)
    assert proc.returncode == 1 and "diffusers: want 0.42.1, found 0.41.0, 0.42.1" in proc.stderr
    proc = _check(tmp_path / "c", GOOD, TORCHAO_VERSION="0.17.0")
    assert proc.returncode == 1 and "torchao: want 0.17.0, found 0.18.0" in proc.stderr
