"""Attention kernels behind one interface, `attend(q, k, v, mask)`, the signature of SDPA with a key mask.

A batch of windows of different lengths is padded to the longest (decoding.decode_windows); SDPA then
attends over the padding too, masked out. flash-attn's variable-length kernel (`flash_attn_varlen_func`)
takes the windows packed end to end instead, each with its own length (cu_seqlens), so no padded key or
query costs anything. `varlen_attention` packs, calls a kernel and unpacks; `varlen_reference` is that
kernel in plain torch (one SDPA per sequence), which stands in for flash-attn on the CPU and in tests.

The backend is "sdpa" unless `use_backend("varlen")` is called: flash-attn is imported only then, only on a
GPU, and SDPA stays the path wherever it is absent, on the CPU and for batches with nothing padded.
scripts/gpu_acceptance.sh times both on ragged batches; the default follows what it measures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "varlen")
DEFAULT_BACKEND = "sdpa"  # until the GPU acceptance run shows varlen faster on ragged batches

_backend = {"name": DEFAULT_BACKEND, "kernel": None}


def use_backend(name: str, kernel=None) -> None:
    """Select the attention backend for this process. kernel: a varlen kernel with flash-attn's signature
    (default: flash-attn's, on GPU tensors; `varlen_reference` runs anywhere)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    _backend.update(name=name, kernel=kernel)


def flash_varlen_kernel():
    """flash-attn's variable-length kernel, or None where flash-attn is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           same_lengths: bool = False) -> torch.Tensor:
    """SDPA's contract: q [B, H, T, hs], k/v [B, H, S, hs], mask bool [B, 1, 1, S] (True: a real key) or None
    -> [B, H, T, hs]. same_lengths: the queries are padded like the keys (self-attention), so padded
    queries are skipped too (their outputs are zero; they are padding, which no real position reads)."""
    if mask is None or _backend["name"] == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    kernel = _backend["kernel"]
    if kernel is None:
        # flash-attn runs half-precision CUDA tensors only
        kernel = flash_varlen_kernel() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
        if kernel is None:  # no flash-attn here: SDPA, the same result
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    k_lengths = mask[:, 0, 0].sum(-1)
    q_lengths = k_lengths if same_lengths else None
    return varlen_attention(q, k, v, q_lengths, k_lengths, kernel)


def pack(x: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """x [B, H, S, hs] with sequence b's first lengths[b] rows real (None: all S) -> (packed [sum, H, hs],
    cu_seqlens int32 [B + 1], longest length)."""
    B, H, S, hs = x.shape
    if lengths is None:
        lengths = torch.full((B,), S, device=x.device, dtype=torch.long)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=x.device)
    cu[1:] = lengths.cumsum(0)
    real = torch.arange(S, device=x.device) < lengths[:, None]  # [B, S]
    return x.transpose(1, 2)[real], cu, int(lengths.max())


def unpack(packed: torch.Tensor, cu: torch.Tensor, S: int) -> torch.Tensor:
    """packed [sum, H, hs] -> [B, H, S, hs], zeros past each sequence's length."""
    B = cu.numel() - 1
    lengths = (cu[1:] - cu[:-1]).long()
    real = torch.arange(S, device=packed.device) < lengths[:, None]
    out = packed.new_zeros(B, S, *packed.shape[1:])
    out[real] = packed
    return out.transpose(1, 2)


def varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **_):
    """flash_attn_varlen_func in plain torch: q [sum_q, H, hs], k/v [sum_k, H, hs], sequence b being rows
    cu[b]:cu[b+1] of each, non-causal, scaled by 1/sqrt(hs) -> [sum_q, H, hs]."""
    out = torch.empty_like(q)
    bounds = zip(cu_seqlens_q.tolist(), cu_seqlens_q[1:].tolist(), cu_seqlens_k.tolist(), cu_seqlens_k[1:].tolist())
    for q0, q1, k0, k1 in bounds:
        y = F.scaled_dot_product_attention(q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1))
        out[q0:q1] = y.transpose(0, 1)
    return out


def varlen_attention(q, k, v, q_lengths, k_lengths, kernel=varlen_reference) -> torch.Tensor:
    """Attention over sequences packed without padding. q [B, H, T, hs] (q_lengths: real queries per row,
    None: all T), k/v [B, H, S, hs] (k_lengths real keys per row) -> [B, H, T, hs], zeros at padded queries.
    flash-attn needs k and v of one head count; grouped keys are expanded by the caller, as for SDPA."""
    T = q.size(2)
    qp, cu_q, max_q = pack(q, q_lengths)
    kp, cu_k, max_k = pack(k, k_lengths)
    vp, _, _ = pack(v, k_lengths)
    y = kernel(qp.contiguous(), kp.contiguous(), vp.contiguous(), cu_q, cu_k, max_q, max_k)
    return unpack(y, cu_q, T)
