"""Varlen attention through PyTorch's own CUDA FlashAttention-2 kernels (no extra install).

Calls `aten._flash_attention_forward` / `aten._flash_attention_backward` in their varlen form, as
`torch.nn.attention.varlen` does. Schemas in torch 2.13 (`torch.ops.aten.<op>.default._schema`):
    _flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
        return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None, ...)
        -> (output, softmax_logsumexp, rng_state, unused, debug_attn_mask)
    _flash_attention_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q,
        max_k, dropout_p, is_causal, rng_state, unused, *, scale=None, ...) -> (dq, dk, dv)
q [Tq, Hq, D], k/v [Tk, Hkv, D], cum_seq_* int32 [S+1], logsumexp float32 [Hq, Tq] (its meta function in
torch/_meta_registrations.py), causal masks aligned bottom-right. Dropout is never used, so the RNG state
handed to the backward is a placeholder. Same contract as `cpu.py`; `contract.py` checks every result.

Refused: compute capability below 8.0 (the kernels are built for sm80+) and ROCm, whose default
(AOTriton) varlen kernel returns a padded log-sum-exp [S, H, max_seqlen] unless AOTriton has compact
varlen lse (pytorch issue #187872, PR #187899), so that `auto` falls through instead of merging wrong numbers.
"""
from __future__ import annotations

from typing import Callable

import torch

from pg_deepspeed.attention.contract import (DeviceFacts, Kernels, check_backward, check_forward, half_on_cuda,
                                             probe, returned)

NAME = "torch"


def decide(facts: DeviceFacts, dtype: torch.dtype, flash_built: bool) -> str | None:
    """Why this backend cannot run (the pure decision; `available` probes its inputs), or None."""
    reason = half_on_cuda(NAME, facts, dtype)
    if reason is not None:
        return reason
    if facts.hip is not None:
        return (f"backend {NAME!r} is refused on ROCm (HIP {facts.hip}): there aten._flash_attention_forward "
                "returns a padded log-sum-exp, which the merge cannot use")
    if not flash_built:
        return f"backend {NAME!r} needs a PyTorch build with CUDA flash attention"
    return None


def available(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when this backend can run; otherwise why not."""
    facts = probe(device)
    return decide(facts, dtype, facts.capability is not None and _flash_built())


def _flash_built() -> bool:
    """Whether this PyTorch build has its CUDA flash-attention kernels."""
    return torch.backends.cuda.is_flash_attention_available()


def bind(label: str, forward: Callable, backward: Callable) -> Kernels:
    return Kernels(label, forward, backward)


_kernels = bind(f"torch {torch.__version__}", torch.ops.aten._flash_attention_forward,
                torch.ops.aten._flash_attention_backward)


def kernels() -> Kernels:
    return _kernels


def forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    kn = kernels()
    q, k, v = (x.contiguous() for x in (q, k, v))
    result = kn.forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale)
    out, lse, _rng, _unused, _mask = returned(result, 5, NAME, kn.label, "forward")
    return check_forward(NAME, kn.label, q, out, lse)


def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    kn = kernels()
    dout, q, k, v, out = (x.contiguous() for x in (dout, q, k, v, out))
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.empty(0, device=q.device)
    result = kn.backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, rng_state,
                         unused, scale=scale)
    dq, dk, dv = returned(result, 3, NAME, kn.label, "backward")
    return check_backward(NAME, kn.label, q, k, v, dq, dk, dv)
