"""What a system costs besides time: its peak memory (`MemoryMeter`); and `sync`, which waits for the
device that runs a system, so that a wall clock read after it counts the device's work."""

from __future__ import annotations

import gc
import resource
from typing import Any


def sync(device: str) -> None:
    from ..distributed import synchronize

    synchronize(device)  # the GPU that runs the system, not the current one


def _proc_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryMeter:
    """Peak RSS while one system is loaded and run: Linux's VmHWM, reset through /proc/self/clear_refs
    before the system starts. Where that reset is impossible the process-lifetime ru_maxrss is reported
    instead, and labelled so."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "5": reset the peak RSS to the current RSS (Linux >= 4.0)
            self.method = "VmHWM reset per system"
        except OSError:
            self.method = "ru_maxrss (process lifetime)"
        self.baseline_kb = _proc_status_kb("VmRSS")
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)  # counters of the GPU that runs the system

    def stop(self) -> dict[str, Any]:
        peak_kb = _proc_status_kb("VmHWM") if self.method.startswith("VmHWM") else None
        if peak_kb is None:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        out = {
            "peak_rss_mb": peak_kb / 1024,
            "baseline_rss_mb": (self.baseline_kb or 0) / 1024,
            "peak_rss_added_mb": (peak_kb - (self.baseline_kb or 0)) / 1024,
            "rss_method": self.method,
            "cuda_max_allocated_mb": None,
        }
        if self.device.startswith("cuda"):
            import torch

            out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out
