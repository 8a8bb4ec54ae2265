"""Contract doubles of the GPU varlen kernels, for testing our calling code on CPU.

These are NOT our implementation: they restate, densely and slowly, the documented contract of
  - flash-attn's `_flash_attn_varlen_forward` / `_flash_attn_varlen_backward` in both calling conventions
    (2.6.x: 8 return values, `window_size` tuple; 2.7.0-2.8.x: 4 return values, `window_size_left/right`),
  - FlashAttention-3's `_flash_attn_forward` / `_flash_attn_backward` (hopper/flash_attn_interface.py, 2025-08+),
  - PyTorch's `aten._flash_attention_forward` / `aten._flash_attention_backward` (varlen form),
which cannot run here (no GPU). Each double has its kernel's parameter list (names, order, defaults) as read
from that version's source, so a call in another version's convention fails. Contract: q [Tq, Hq, D],
k/v [Tk, Hkv, D], Hq % Hkv == 0 (query head h reads kv head h // (Hq/Hkv)); cu_seqlens int32 [S+1]; causal
masks are aligned bottom-right (query i of a sequence sees key j when j <= i + Lk - Lq); softmax_lse is
float32 [Hq, Tq]. The backward recomputes P = exp(q kᵀ·scale - lse) from the lse it is given and uses
D = rowsum(dout ∘ out) from the out it is given.
"""
from __future__ import annotations

import torch


def _mask(lq: int, lk: int, causal: bool) -> torch.Tensor:
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    return (j <= i + lk - lq) if causal else torch.ones(lq, lk, dtype=torch.bool)


def _forward(q, k, v, cu_q, cu_k, scale, causal):
    g = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)
    for s in range(cu_q.numel() - 1):
        a, b, c, d = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        kk, vv = k[c:d].repeat_interleave(g, 1).double(), v[c:d].repeat_interleave(g, 1).double()
        sc = torch.einsum("qhd,khd->hqk", q[a:b].double(), kk) * scale
        sc = sc.masked_fill(~_mask(b - a, d - c, causal), float("-inf"))
        l = torch.logsumexp(sc, -1)
        out[a:b] = torch.einsum("hqk,khd->qhd", torch.exp(sc - l[..., None]), vv).to(q.dtype)
        lse[:, a:b] = l.float()
    return out, lse


def _backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, causal):
    g = q.shape[1] // k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for s in range(cu_q.numel() - 1):
        a, b, c, d = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        qq, do, oo = q[a:b].double(), dout[a:b].double(), out[a:b].double()
        kk, vv = k[c:d].repeat_interleave(g, 1).double(), v[c:d].repeat_interleave(g, 1).double()
        sc = torch.einsum("qhd,khd->hqk", qq, kk) * scale
        sc = sc.masked_fill(~_mask(b - a, d - c, causal), float("-inf"))
        p = torch.exp(sc - lse[:, a:b, None].double())
        dvv = torch.einsum("hqk,qhd->khd", p, do)
        dp = torch.einsum("qhd,khd->hqk", do, vv)
        ds = p * (dp - (do * oo).sum(-1).transpose(0, 1)[..., None])
        dq[a:b] = (torch.einsum("hqk,khd->qhd", ds, kk) * scale).to(q.dtype)
        dkk = torch.einsum("hqk,qhd->khd", ds, qq) * scale
        dk[c:d] += dkk.unflatten(1, (-1, g)).sum(2).to(k.dtype)
        dv[c:d] += dvv.unflatten(1, (-1, g)).sum(2).to(v.dtype)
    return dq, dk, dv


def flash_attn_26_varlen_forward(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
    window_size, softcap, alibi_slopes, return_softmax, block_table=None, leftpad_k=None, seqused_k=None,
):
    """Double of flash-attn 2.6.x `_flash_attn_varlen_forward` (no defaults before block_table in 2.6.0)
    -> (out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state)."""
    assert dropout_p == 0.0 and tuple(window_size) == (-1, -1) and softcap == 0.0 and not return_softmax
    out, lse = _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    return out, q, k, v, out, lse, torch.empty(0), torch.zeros(2, dtype=torch.int64)


def flash_attn_26_varlen_backward(
    dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, rng_state=None,
):
    """Double of flash-attn 2.6.x `_flash_attn_varlen_backward`: writes dq, dk, dv in place,
    returns (dq, dk, dv, softmax_d)."""
    assert dropout_p == 0.0 and tuple(window_size) == (-1, -1) and softcap == 0.0
    gq, gk, gv = _backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    dq.copy_(gq), dk.copy_(gk), dv.copy_(gv)
    return dq, dk, dv, torch.empty(q.shape[1], q.shape[0])


def flash_attn_27_varlen_forward(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
    window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False,
    block_table=None, leftpad_k=None, seqused_k=None, zero_tensors=False,
):
    """Double of flash-attn 2.7.0-2.8.x `_flash_attn_varlen_forward` -> (out, softmax_lse, S_dmask, rng_state)."""
    assert dropout_p == 0.0 and window_size_left == -1 and window_size_right == -1 and softcap == 0.0
    out, lse = _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    return out, lse, torch.empty(0), torch.zeros(2, dtype=torch.int64)


def flash_attn_27_varlen_backward(
    dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes,
    deterministic, rng_state=None, zero_tensors=False,
):
    """Double of flash-attn 2.7.0-2.8.x `_flash_attn_varlen_backward`: writes dq, dk, dv in place, returns softmax_d."""
    assert dropout_p == 0.0 and window_size_left == -1 and window_size_right == -1 and softcap == 0.0
    gq, gk, gv = _backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    dq.copy_(gq), dk.copy_(gk), dv.copy_(gv)
    return torch.empty(q.shape[1], q.shape[0])


def fa3_forward(
    q, k, v, k_new=None, v_new=None, qv=None, out_=None, cu_seqlens_q=None, cu_seqlens_k=None,
    cu_seqlens_k_new=None, seqused_q=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None,
    page_table=None, kv_batch_idx=None, leftpad_k=None, rotary_cos=None, rotary_sin=None, seqlens_rotary=None,
    q_descale=None, k_descale=None, v_descale=None, softmax_scale=None, causal=False, window_size_left=-1,
    window_size_right=-1, attention_chunk=0, softcap=0.0, rotary_interleaved=True, scheduler_metadata=None,
    num_splits=1, pack_gqa=None, sm_margin=0,
):
    """Double of FlashAttention-3's `_flash_attn_forward` (varlen use) -> (out, softmax_lse, out_accum, lse_accum)."""
    assert cu_seqlens_q is not None and cu_seqlens_k is not None and window_size_left == -1 and softcap == 0.0
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out, lse = _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal)
    return out, lse, torch.empty(0), torch.empty(0)


def fa3_backward(
    dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, cu_seqlens_k=None, sequed_q=None, sequed_k=None,
    max_seqlen_q=None, max_seqlen_k=None, dq=None, dk=None, dv=None, softmax_scale=None, is_causal=False,
    window_size_left=-1, window_size_right=-1, softcap=0.0, deterministic=False, sm_margin=0,
):
    """Double of FlashAttention-3's `_flash_attn_backward`: writes dq, dk, dv in place, returns softmax_d."""
    assert cu_seqlens_q is not None and dq is not None and dk is not None and dv is not None
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    gq, gk, gv = _backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, scale, is_causal)
    dq.copy_(gq), dk.copy_(gk), dv.copy_(gv)
    return torch.empty(q.shape[1], q.shape[0])


def aten_flash_attention_forward(
    query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *,
    scale=None, window_size_left=None, window_size_right=None, seqused_k=None, alibi_slopes=None,
    block_table=None, num_splits=None,
):
    """Double of `aten._flash_attention_forward` (varlen) -> (out, lse, rng_state, unused, debug_mask)."""
    assert dropout_p == 0.0 and not return_debug_mask
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    out, lse = _forward(query, key, value, cum_seq_q, cum_seq_k, scale, is_causal)
    return out, lse, torch.zeros(2, dtype=torch.uint64), torch.empty(0), torch.empty(0)


def aten_flash_attention_backward(
    grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
    rng_state, unused, *, scale=None, window_size_left=None, window_size_right=None,
):
    """Double of `aten._flash_attention_backward` (varlen) -> (dq, dk, dv)."""
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    return _backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, scale, is_causal)
