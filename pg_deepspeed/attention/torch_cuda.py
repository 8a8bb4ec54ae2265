"""Varlen attention through PyTorch's own CUDA FlashAttention-2 kernels (no extra install).

Calls `aten._flash_attention_forward` / `aten._flash_attention_backward` in their varlen form,
as `torch.nn.attention.varlen` does: q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seq_* int32 [S+1],
lse [Hq, Tq] float32, causal masks aligned bottom-right. Dropout is never used, so the RNG state
handed to the backward is a placeholder. Same contract as `cpu.py`.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

HALF = (torch.float16, torch.bfloat16)


def available(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when this backend can run; otherwise why not."""
    if device.type != "cuda":
        return f"backend 'torch' needs CUDA tensors, got device {device}"
    if dtype not in HALF:
        return f"backend 'torch' needs float16 or bfloat16, got {dtype}; use backend='cpu' for {dtype}"
    if not torch.backends.cuda.is_flash_attention_available():
        return "backend 'torch' needs a PyTorch build with CUDA flash attention (sm80 or newer)"
    return None


kernels = SimpleNamespace(
    forward=torch.ops.aten._flash_attention_forward, backward=torch.ops.aten._flash_attention_backward
)


def forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    out, lse, _rng, _unused, _mask = kernels.forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale
    )
    return out, lse


def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.empty(0, device=q.device)
    dq, dk, dv = kernels.backward(
        dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, rng_state, unused, scale=scale
    )
    return dq, dk, dv
