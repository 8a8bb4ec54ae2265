"""Naive references. Every equivalence test compares against these, never against the code under test."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def dense_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """q: [L, Hq, D], k/v: [L, Hkv, D] -> [L, Hq, D], plain softmax attention with a causal mask."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device).tril()
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("hqk,khd->qhd", p, v)


def repeated_prefix_attention(q, k, v, prefix_lens, suffix_lens, scale=None):
    """The standard forward: every member as its own `[prefix ; suffix]`, prefix repeated G times.

    q, k, v are packed `[prefix_g | suffix_g1 | ...]` group by group; returns the packed output
    where a prefix row is taken from the group's first member (every member gives the same rows).
    """
    out = torch.empty_like(q)
    at = 0
    for p, members in zip(prefix_lens, suffix_lens):
        pre = slice(at, at + p)
        at += p
        for i, s in enumerate(members):
            suf = slice(at, at + s)
            at += s
            o = dense_causal_attention(
                torch.cat([q[pre], q[suf]]), torch.cat([k[pre], k[suf]]), torch.cat([v[pre], v[suf]]), scale
            )
            if i == 0:
                out[pre] = o[:p]
            out[suf] = o[p:]
    return out
