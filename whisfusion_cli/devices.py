"""Which device and float type a run uses: `--device` and `--dtype` resolved once, the same way for
`whisfusion transcribe`, bench and the Python API.

torch is imported inside the function, so the CLI can import this module for `--help`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .choices import DTYPES

if TYPE_CHECKING:
    import torch

DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def resolve_device(device: str = "auto", dtype: str = "auto") -> "tuple[torch.device, torch.dtype]":
    """(device, dtype) for the options; a one-line ValueError for a combination that cannot run."""
    import torch

    from .distributed import half_dtype, rank_device

    dtype = DTYPE_ALIASES.get((dtype or "auto").lower(), (dtype or "auto").lower())
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    dev = rank_device(device)  # "cuda" is cuda:LOCAL_RANK under torchrun
    if dtype == "auto":
        # The 16-bit float the chosen GPU runs natively (bf16 from Ampere on, fp16 on a T4 or V100, where bf16
        # is emulated and CTranslate2's encoder refuses it).
        dtype = "float32" if dev.type == "cpu" else str(half_dtype(dev)).replace("torch.", "")
    if dev.type == "cpu" and dtype != "float32":
        # No native bf16/fp16 matmul on common CPUs: orders of magnitude slower, and not what we test.
        raise ValueError(f"--dtype {dtype} is only supported on a GPU; use float32 on the CPU")
    return dev, getattr(torch, dtype)
