"""bench/mini_urae.py --quick: every stage of the miniature URAE benchmark runs and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mini_urae_bench_quick_trains_every_adapter_and_prints_one_table(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "bench/mini_urae.py", "--quick", "--work", str(work), "--json", str(tmp_path / "rows.json")],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    numbers = [line.split("|")[1].strip() for line in lines[1:]]  # after the header (the rule starts "|-")
    assert numbers[0] == "1" and {"2", "3", "4", "5"} <= set(numbers), proc.stdout
    assert any("minor components" in line for line in lines) and any("plain LoRA" in line for line in lines)
    # The adapters came from the project's training code on the teacher's data.
    for name in ("2x-lora-2", "2x-lora-4", "4x-minor_components", "4x-lora"):
        assert (work / "adapters" / name / "adapter.safetensors").is_file()
    assert len(list((work / "data" / "teacher-4x-2").glob("*.png"))) == 2
