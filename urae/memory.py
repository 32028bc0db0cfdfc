"""Peak memory of one piece of work: the CUDA allocator's peak on a GPU, the peak RSS rise on a CPU."""

from __future__ import annotations

import resource
from pathlib import Path

import torch

# Timing keys (bytes) a generation reports: one of the two, by device type.
PEAK_GPU_KEY = "peak_gpu_memory_bytes"
PEAK_RSS_KEY = "peak_rss_delta_bytes"

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_rss_peak() -> bool:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Measure the peak memory between :meth:`start` and :meth:`stop`.

    CUDA: ``torch.cuda.max_memory_allocated`` of that device (absolute: weights included), after
    resetting its peak. CPU: how far the peak RSS rose above the RSS at start (Linux resets the peak
    per measurement; elsewhere the lifetime ``ru_maxrss`` only shows new highs).
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._rss_start = 0
        self._hwm_reset = False

    @property
    def key(self) -> str:
        return PEAK_GPU_KEY if self.device.type == "cuda" else PEAK_RSS_KEY

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._hwm_reset = _reset_rss_peak()
        rss = _status_kib("VmRSS") if self._hwm_reset else None
        self._rss_start = rss * 1024 if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> int:
        """The peak in bytes (see the class)."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _status_kib("VmHWM") if self._hwm_reset else None
        peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, peak - self._rss_start)
