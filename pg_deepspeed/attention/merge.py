"""Log-sum-exp merges: two attention passes over disjoint key sets, and an attention sink.

If pass a attends keys K_a and pass b keys K_b (disjoint), with outputs O_a, O_b and
log-sum-exps L_a, L_b, attention over K_a ∪ K_b is

    L = log(exp(L_a) + exp(L_b)),    O = exp(L_a - L) · O_a + exp(L_b - L) · O_b.

A sink (gpt-oss's `s_aux`) is one more logit s_h per head in every row's softmax denominator with no
value: a "pass" with O_b = 0 and L_b = s_h, so L' = logaddexp(L, s_h) and O' = exp(L - L') · O.
"""
from __future__ import annotations

import torch
from torch import Tensor


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """out_*: [T, H, D]; lse_*: [H, T] -> merged (out [T, H, D] in out_a's dtype, lse [H, T])."""
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).transpose(0, 1).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse).transpose(0, 1).unsqueeze(-1)
    acc = torch.promote_types(out_a.dtype, lse.dtype)
    out = out_a.to(acc) * w_a + out_b.to(acc) * w_b
    return out.to(out_a.dtype), lse


def add_sink(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """out: [T, H, D]; lse: [H, T]; sinks: [H] -> (out [T, H, D] in out's dtype, lse [H, T]) with the sink merged."""
    lse_s = torch.logaddexp(lse, sinks.to(lse.dtype)[:, None])
    weight = torch.exp(lse - lse_s).transpose(0, 1).unsqueeze(-1)
    acc = torch.promote_types(out.dtype, lse.dtype)
    return (out.to(acc) * weight).to(out.dtype), lse_s


def sink_grad(dout: Tensor, out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """d loss / d sinks [H], given the final out [T, H, D] and lse [H, T] (sink included) and dout [T, H, D].

    With p_s = exp(s_h - L'_i) the sink's probability in row i and D_i = rowsum(dO_i ∘ O'_i):
    dL/ds_h = -Σ_i p_s · D_i (the sink's value is 0, so its dP term vanishes).
    """
    acc = torch.promote_types(out.dtype, lse.dtype)
    d = (dout.to(acc) * out.to(acc)).sum(-1).transpose(0, 1)  # [H, T]
    p_sink = torch.exp(sinks.to(lse.dtype)[:, None] - lse)
    return -(p_sink * d).sum(1).to(sinks.dtype)


def merge_rows(out: Tensor, lse: Tensor, out_x: Tensor, lse_x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Merge partial passes into whole rows: the n-way form of `merge_attention`.

    out: [T, H, D], lse: [H, T], one pass over some keys of every row; out_x: [R, H, D], lse_x: [H, R], passes of
    rows `rows` [R] over other, disjoint key sets (a row may appear several times, once per key set).
    L = log(e^L_row + Σ e^L_x) computed from the row-wise max M; O = e^(L_row-L) O_row + Σ e^(L_x-L) O_x.
    Returns (out [T, H, D] in out's dtype, lse [H, T]).
    """
    acc = torch.promote_types(out.dtype, lse.dtype)
    H = lse.shape[0]
    m = lse.scatter_reduce(1, rows.expand(H, -1), lse_x, "amax")
    total = torch.exp(lse - m).index_add(1, rows, torch.exp(lse_x - m[:, rows]))
    merged_lse = m + torch.log(total)
    w = torch.exp(lse - merged_lse).transpose(0, 1).unsqueeze(-1)
    w_x = torch.exp(lse_x - merged_lse[:, rows]).transpose(0, 1).unsqueeze(-1)
    merged = (out.to(acc) * w).index_add(0, rows, out_x.to(acc) * w_x)
    return merged.to(out.dtype), merged_lse
