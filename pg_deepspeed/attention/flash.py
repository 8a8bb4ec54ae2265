"""Varlen attention through the flash-attn package (FlashAttention-2, >= 2.6).

Uses the package's own varlen kernels, `_flash_attn_varlen_forward(q, k, v, cu_seqlens_q,
cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, ...)` returning
(out, softmax_lse [Hq, Tq] float32, S_dmask, rng_state), and `_flash_attn_varlen_backward(dout, q,
k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
dropout_p, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, deterministic,
rng_state)` which writes dq, dk, dv in place. GQA is native (Hq % Hkv == 0). Same contract as
`cpu.py`. flash-attn is an optional extra: `pip install 'pg_deepspeed[flash]'`.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import SimpleNamespace

import torch

HALF = (torch.float16, torch.bfloat16)
_kernels: SimpleNamespace | None = None


def kernels() -> SimpleNamespace:
    """The flash-attn varlen forward/backward callables, imported on first use."""
    global _kernels
    if _kernels is None:
        iface = importlib.import_module("flash_attn.flash_attn_interface")
        fwd = getattr(iface, "_wrapped_flash_attn_varlen_forward", None) or iface._flash_attn_varlen_forward
        bwd = getattr(iface, "_wrapped_flash_attn_varlen_backward", None) or iface._flash_attn_varlen_backward
        _kernels = SimpleNamespace(forward=fwd, backward=bwd)
    return _kernels


def available(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when this backend can run; otherwise why not."""
    if importlib.util.find_spec("flash_attn") is None:
        return "backend 'flash_attn' needs the flash-attn package: pip install 'pg_deepspeed[flash]'"
    if device.type != "cuda":
        return f"backend 'flash_attn' needs CUDA tensors, got device {device}"
    if dtype not in HALF:
        return f"backend 'flash_attn' needs float16 or bfloat16, got {dtype}"
    return None


def forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    out, lse, _s, _rng = kernels().forward(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_q, max_k, 0.0, scale, causal
    )
    return out, lse


def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kernels().backward(
        dout.contiguous(), q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k,
        0.0, scale, causal, -1, -1, 0.0, None, False, None,
    )
    return dq, dk, dv
