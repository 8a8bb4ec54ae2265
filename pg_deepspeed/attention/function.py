"""The prefix-grouped attention as one autograd Function over any backend module."""
from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from ..layout import PrefixGroupLayout
from .merge import add_sink, merge_attention, sink_grad


class PrefixGroupedAttention(torch.autograd.Function):
    """Exact attention for `[prefix | suffix_1 | ... | suffix_G]` with the prefix K/V stored once.

    Keys of a suffix token split into two disjoint sets, each one varlen pass:
      causal pass: every segment (prefix, each suffix) causally over itself   -> (O_c, L_c)
      cross pass:  each group's suffix queries over that group's prefix keys  -> (O_x, L_x)
    Forward merges on suffix rows: L = logaddexp(L_c, L_x), O = e^(L_c-L) O_c + e^(L_x-L) O_x.
    When every group has one member (the standard forward, `prefix_grouping=False`) each group is a
    single causal sequence and one causal pass over whole groups is the whole attention.
    Sinks (optional, [Hq]) enter every row last: L' = logaddexp(L, s), O' = e^(L-L') O (see merge.py).
    Backward: a flash backward recomputes P = exp(q kᵀ s - L) and uses D = rowsum(dO ∘ O); given
    the merged (O, L) both are the true ones restricted to the pass's keys, so
    dq = dq_c + dq_x, and dk, dv are the causal parts plus the cross parts scattered onto the prefix;
    a sink is a key with no value, so dq, dk, dv need nothing more and ds = -Σ_rows e^(s-L') D.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, layout: PrefixGroupLayout, backend: ModuleType, scale: float,
                sinks: Tensor | None = None):
        L = layout
        ctx.layout, ctx.backend, ctx.scale = layout, backend, scale
        if L.single_member:  # every group is one plain causal sequence [prefix ; suffix]
            out, lse = backend.forward(q, k, v, L.cu_groups, L.cu_groups, L.max_group, L.max_group, True, scale)
        else:
            out, lse = backend.forward(q, k, v, L.cu_seqlens, L.cu_seqlens, L.max_seqlen, L.max_seqlen, True, scale)
            si, pi = L.suffix_index, L.prefix_index
            out_x, lse_x = backend.forward(
                q[si], k[pi], v[pi], L.cu_suffix, L.cu_prefix, L.max_suffix_block, L.max_prefix, False, scale
            )
            out_s, lse_s = merge_attention(out[si], lse[:, si], out_x, lse_x)
            out = out.index_copy(0, si, out_s)
            lse = lse.index_copy(1, si, lse_s)
        if sinks is not None:
            out, lse = add_sink(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        L, backend, scale = ctx.layout, ctx.backend, ctx.scale
        dsinks = None if sinks is None or not ctx.needs_input_grad[6] else sink_grad(dout, out, lse, sinks)
        if L.single_member:
            grads = backend.backward(dout, q, k, v, out, lse, L.cu_groups, L.cu_groups, L.max_group, L.max_group,
                                     True, scale)
            return *grads, None, None, None, dsinks
        si, pi = L.suffix_index, L.prefix_index
        dq, dk, dv = backend.backward(
            dout, q, k, v, out, lse, L.cu_seqlens, L.cu_seqlens, L.max_seqlen, L.max_seqlen, True, scale
        )
        dq_x, dk_x, dv_x = backend.backward(
            dout[si], q[si], k[pi], v[pi], out[si], lse[:, si].contiguous(),
            L.cu_suffix, L.cu_prefix, L.max_suffix_block, L.max_prefix, False, scale,
        )
        dq = dq.index_add(0, si, dq_x)
        dk = dk.index_add(0, pi, dk_x)
        dv = dv.index_add(0, pi, dv_x)
        return dq, dk, dv, None, None, None, dsinks
