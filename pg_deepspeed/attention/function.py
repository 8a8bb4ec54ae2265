"""Prefix-grouped attention as one autograd Function over any backend module and any layout's attention plan."""
from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from pg_deepspeed.layouts.attention_plan import AttentionPlan
from pg_deepspeed.attention.merge import add_sink, merge_attention, merge_rows, sink_grad


class PrefixGroupedAttention(torch.autograd.Function):
    """Exact attention over a packed forest of segments (`PrefixGroupLayout`, `PrefixTreeLayout`), every
    segment's K/V stored once. The attention plan P (layouts/attention_plan.py) splits each row's keys into disjoint
    sets:
      causal pass: each run (a chain of segments) causally over itself                   -> (O_c, L_c)
      cross pass:  each ancestor run's keys, for every query row below it (once per ancestor) -> (O_x, L_x)
    Forward merges per row: L = log(e^L_c + Σ e^L_x), O = e^(L_c-L) O_c + Σ e^(L_x-L) O_x.
    Sinks (optional, [Hq]) enter every row last: L' = logaddexp(L, s), O' = e^(L-L') O (see merge.py).
    Backward: a flash backward recomputes P = exp(q kᵀ s - L) and uses D = rowsum(dO ∘ O); given the merged
    (O, L) both are the true ones restricted to the pass's keys, so dq is the causal part plus every cross part
    summed onto its row, and dk, dv the causal parts plus the cross parts scattered onto the ancestor tokens;
    a sink is a key with no value, so dq, dk, dv need nothing more and ds = -Σ_rows e^(s-L') D.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, P: AttentionPlan, backend: ModuleType, scale: float,
                sinks: Tensor | None = None):
        ctx.plan, ctx.backend, ctx.scale = P, backend, scale
        out, lse = backend.forward(q, k, v, P.cu_causal, P.cu_causal, P.max_causal, P.max_causal, True, scale)
        if P.has_cross:
            qi, ki = P.cross_q, P.cross_k
            out_x, lse_x = backend.forward(
                q[qi], k[ki], v[ki], P.cu_cross_q, P.cu_cross_k, P.max_cross_q, P.max_cross_k, False, scale
            )
            if P.cross_rows_unique:  # two levels: merge the cross rows alone, write them back
                out_s, lse_s = merge_attention(out[qi], lse[:, qi], out_x, lse_x)
                out, lse = out.index_copy(0, qi, out_s), lse.index_copy(1, qi, lse_s)
            else:
                out, lse = merge_rows(out, lse, out_x, lse_x, qi)
        if sinks is not None:
            out, lse = add_sink(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        P, backend, scale = ctx.plan, ctx.backend, ctx.scale
        dsinks = None if sinks is None or not ctx.needs_input_grad[6] else sink_grad(dout, out, lse, sinks)
        dq, dk, dv = backend.backward(
            dout, q, k, v, out, lse, P.cu_causal, P.cu_causal, P.max_causal, P.max_causal, True, scale
        )
        if P.has_cross:
            qi, ki = P.cross_q, P.cross_k
            dq_x, dk_x, dv_x = backend.backward(
                dout[qi], q[qi], k[ki], v[ki], out[qi], lse[:, qi].contiguous(),
                P.cu_cross_q, P.cu_cross_k, P.max_cross_q, P.max_cross_k, False, scale,
            )
            dq = dq.index_add(0, qi, dq_x)
            dk = dk.index_add(0, ki, dk_x)
            dv = dv.index_add(0, ki, dv_x)
        return dq, dk, dv, None, None, None, dsinks
