"""Log-sum-exp merge of two attention passes over disjoint key sets.

If pass a attends keys K_a and pass b keys K_b (disjoint), with outputs O_a, O_b and
log-sum-exps L_a, L_b, attention over K_a ∪ K_b is

    L = log(exp(L_a) + exp(L_b)),    O = exp(L_a - L) · O_a + exp(L_b - L) · O_b.
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
