"""The benchmark scripts run end to end on a CPU (small sizes), so they do not rot between GPU runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


# bench/gpu_generate.py runs through bench/device_check.sh --quick: tests/bench/test_device_check.py


def test_vae_decode_bench_reports_bounded_memory():
    out = _run("bench/vae_decode.py", "--size", "1024")
    assert "tiled/full peak RSS" in out and "|tiled - full| max" in out
    assert "exact/full peak RSS" in out and "|exact - full| max" in out


def test_hotswap_bench_compares_before_and_after_at_the_real_module_count():
    out = _run("bench/hotswap.py", "--repeat", "2")
    assert "19 double + 38 single blocks" in out and "1279 modules" in out
    assert "after swap (one batched copy)" in out and "batched copy alone at width 3072" in out
    if "before (" in out and "not available" not in out:
        # 100-200x apart when measured: the order cannot flip on a busy machine.
        speedup = float(out.rsplit("swap speed-up (median, same run):", 1)[1].split("x")[0])
        assert speedup > 5
