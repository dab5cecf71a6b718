"""Which device and float type a run uses: `--device` and `--dtype` resolved once, the same way for
`whisfusion transcribe`, bench and the Python API.

`device_names` gives them as strings and imports torch only where torch must answer (a GPU could be there, or
a device other than the CPU is asked for), so `--device cpu` and a machine without a GPU never import torch
to settle them; `resolve_device` gives the torch objects. The CLI can import this module for `--help`.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import TYPE_CHECKING

from .choices import DTYPES

if TYPE_CHECKING:
    import torch

DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
# What a GPU torch could use leaves in the file system on Linux: NVIDIA's device nodes and driver entries,
# WSL2's GPU and a Jetson's (no /dev/nvidia* on either), and ROCm's (torch's ROCm build answers torch.cuda).
CUDA_DEVICE_PATTERNS = ("/dev/nvidia[0-9]*", "/proc/driver/nvidia/gpus/*")
GPU_DEVICE_FILES = ("/dev/dxg", "/dev/nvhost-ctrl-gpu", "/dev/kfd")


def cuda_possible() -> bool:
    """Whether torch.cuda could find a GPU here. False only where none can be: on Linux, no GPU device node or
    driver entry; on macOS, torch has no CUDA. Elsewhere (Windows) only torch can tell."""
    if sys.platform == "darwin":
        return False
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(f) for f in GPU_DEVICE_FILES) or any(glob.glob(p) for p in CUDA_DEVICE_PATTERNS)


def device_names(device: str | None = "auto", dtype: str | None = "auto") -> tuple[str, str]:
    """(device, dtype) for the options as strings, e.g. ("cpu", "float32"), ("cuda:0", "bfloat16"); a
    one-line ValueError for a combination that cannot run."""
    dtype = DTYPE_ALIASES.get((dtype or "auto").lower(), (dtype or "auto").lower())
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    name = (device or "auto").strip().lower()
    if name == "cpu" or (name == "auto" and not cuda_possible()):
        dev = "cpu"
    else:
        from .distributed import half_dtype, rank_device

        found = rank_device(device)  # "cuda" is cuda:LOCAL_RANK under torchrun
        dev = str(found)
        if dtype == "auto" and found.type != "cpu":
            # The 16-bit float the chosen GPU runs natively (bf16 from Ampere on, fp16 on a T4 or V100, where
            # bf16 is emulated and CTranslate2's encoder refuses it).
            dtype = str(half_dtype(found)).replace("torch.", "")
    if dev == "cpu" and dtype == "auto":
        dtype = "float32"
    if dev == "cpu" and dtype != "float32":
        # No native bf16/fp16 matmul on common CPUs: orders of magnitude slower, and not what we test.
        raise ValueError(f"--dtype {dtype} is only supported on a GPU; use float32 on the CPU")
    return dev, dtype


def resolve_device(device: str = "auto", dtype: str = "auto") -> "tuple[torch.device, torch.dtype]":
    """(device, dtype) for the options as torch objects (device_names' rules); a one-line ValueError for a
    combination that cannot run."""
    import torch

    dev, dtype = device_names(device, dtype)
    return torch.device(dev), getattr(torch, dtype)
