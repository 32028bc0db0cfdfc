"""The device check script runs end to end in its quick mode (CPU, tiny model), so it is right the
first time a GPU runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def test_device_check_quick_mode_writes_its_table_and_images(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/device_check.sh", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    data = json.loads((out / "rows.json").read_text())
    rows = {(r["tier"], r["size"]): r for r in data["rows"]}
    assert ("quality", 64) in rows and ("quality", 128) in rows
    for row in rows.values():
        assert "error" not in row, row
        assert row["per_step_s"] > 0 and row["end_to_end_s"] >= row["denoise_s"] + row["decode_s"]
        assert row["compiles_timed_run"] == 0
    assert "flash_attention" in rows[("quality", 64)]["kernel"]  # the profiler saw the SDPA kernel
    if ("turbo", 128) in rows:  # turbo is compared with quality on the same seed and prompt
        assert rows[("turbo", 128)]["psnr_vs_quality"] > 10
    assert data["hotswap"]["swap_ms"] > 0 and data["hotswap"]["compiles_after_swaps"] == 0

    table = (out / "table.md").read_text()
    assert "| quality | 128 |" in table and "hot-swap" in table and "4096 px: N=66048, total 3908.4 TFLOP" in table
    assert "| quality | 128 |" in proc.stdout  # printed too
    sheets = sorted(out.glob("samples_128_quality*.jpg"))
    assert sheets and Image.open(sheets[0]).size[1] == 2 * 128  # downscaled row + full-resolution crops
    assert (out / "log.txt").read_text().count("device_check") >= 1


def test_budget_skips_rows_and_says_so(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_generate

    status = gpu_generate.main(["--tiny", "--sizes", "64", "128", "--tiers", "quality", "--budget-s", "0.001",
                                "--no-hotswap", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert status == 0
    # the first row always runs; the next one would overrun the budget and is listed as skipped
    data = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["tier"], r["size"]) for r in data["rows"]] == [("quality", 64)]
    assert "skipped: quality 128 px" in printed and data["skipped"][0].startswith("quality 128 px")
