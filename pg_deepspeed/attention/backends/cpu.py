"""Varlen attention on any device, one dense call per sequence.

On CPU each sequence goes through `aten._scaled_dot_product_flash_attention_for_cpu` and its
`_backward` op (a fused, tiled kernel that returns the log-sum-exp). On other devices the same
per-sequence contract is computed with matmuls. The loop is over sequences, never tokens.

Contract (shared by every backend module):
    forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale) -> (out [Tq, Hq, D], lse [Hq, Tq])
    backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale) -> (dq, dk, dv)
q: [Tq, Hq, D]; k, v: [Tk, Hkv, D] with Hq % Hkv == 0; cu_*: int32 [S+1]. Causal sequences
here always have Lq == Lk, where top-left and bottom-right alignment agree.
"""
from __future__ import annotations

import torch
from torch import Tensor

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def available(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when this backend can run; otherwise why not."""
    return None


def _spans(cu_q: Tensor, cu_k: Tensor):
    q_off, k_off = cu_q.tolist(), cu_k.tolist()
    for i in range(len(q_off) - 1):
        yield slice(q_off[i], q_off[i + 1]), slice(k_off[i], k_off[i + 1])


def _heads_first(x: Tensor, groups: int) -> Tensor:
    """[L, H, D] -> [1, H*groups, L, D], each kv head repeated for its query heads."""
    if groups > 1:
        x = x.repeat_interleave(groups, dim=1)
    return x.transpose(0, 1).unsqueeze(0)


def _fold_heads(dx: Tensor, groups: int) -> Tensor:
    """[1, H*groups, L, D] -> [L, H, D], summing the gradient over each kv head's query heads."""
    dx = dx.squeeze(0).transpose(0, 1)
    if groups > 1:
        dx = dx.unflatten(1, (-1, groups)).sum(2)
    return dx


def _acc(x: Tensor) -> Tensor:
    """x in its accumulation dtype: float32 for half types, else its own."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _math_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    s = (_acc(q) @ _acc(k).transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (torch.exp(s - lse.unsqueeze(-1)) @ _acc(v)).to(q.dtype), lse


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    qf, kf, vf, dof = _acc(q), _acc(k), _acc(v), _acc(dout)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    p = torch.exp(s - lse.unsqueeze(-1))
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    ds = p * (dp - (dof * _acc(out)).sum(-1, keepdim=True))
    return (ds @ kf * scale).to(q.dtype), (ds.transpose(-1, -2) @ qf * scale).to(k.dtype), dv.to(v.dtype)


def forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    for sq, sk in _spans(cu_q, cu_k):
        qs, ks, vs = q[sq].transpose(0, 1).unsqueeze(0), _heads_first(k[sk], groups), _heads_first(v[sk], groups)
        if q.device.type == "cpu":
            o, l = _flash_cpu(qs, ks, vs, 0.0, causal, scale=scale)
        else:
            o, l = _math_forward(qs, ks, vs, causal, scale)
        out[sq] = o.squeeze(0).transpose(0, 1)
        lse[:, sq] = l.squeeze(0)
    return out, lse


def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    groups = q.shape[1] // k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for sq, sk in _spans(cu_q, cu_k):
        qs, ks, vs = q[sq].transpose(0, 1).unsqueeze(0), _heads_first(k[sk], groups), _heads_first(v[sk], groups)
        dos, os_ = dout[sq].transpose(0, 1).unsqueeze(0), out[sq].transpose(0, 1).unsqueeze(0)
        ls = lse[:, sq].unsqueeze(0)
        if q.device.type == "cpu":
            gq, gk, gv = _flash_cpu_backward(dos, qs, ks, vs, os_, ls, 0.0, causal, scale=scale)
        else:
            gq, gk, gv = _math_backward(dos, qs, ks, vs, os_, ls, causal, scale)
        dq[sq] = gq.squeeze(0).transpose(0, 1)
        dk[sk] += _fold_heads(gk, groups)
        dv[sk] += _fold_heads(gv, groups)
    return dq, dk, dv
