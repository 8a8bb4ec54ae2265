"""bfloat16 prefix-grouped attention, forward and backward, against float64 within a derived rounding bound.

The bound (u = torch.finfo(torch.bfloat16).eps / 2 = 2^-8, the unit roundoff):

- q, k, v and dout are bf16 and the float64 reference runs on those same values, so input rounding costs nothing.
- Every other error is a bf16 store. A store rounds each element with relative error at most u; under the
  probabilistic rounding model (Higham & Mary 2019: errors independent, mean zero) its rms is at most u/√3
  (an error uniform in [-u, u]), and R stores of values about the size of the result add in quadrature:
  normwise relative error ≈ √R · u/√3, not the worst case R · u that needs every error aligned.
- The float32 sums inside the kernels add at most n · 2^-24 (n ≤ 2000 here: below 0.03 u), which we neglect.
- Stores on the path of each element, for the CPU kernel (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp)
  and our Function:
    out:     P = exp(s - max) stored bf16 before P·V (1), the pass's output (1), the merge's output (1).
    dq:      the pass's bf16 out read back for D = rowsum(dout ∘ out) (1), dS = P(dP - D) stored bf16 before
             dS·K (1), the partial dq stored after each key block of 512
             (r = ⌈n/512⌉ stores, n = keys per query row), the sum of the two passes (index_add, 1).
    dk, dv:  D from the bf16 out (1, dk only), P or dS stored bf16 (1), the partial dk/dv stored after each query block (r = ⌈n/B⌉, n = queries
             per key row, B = 32, 64 or 256 by the call's query count), the fold of a kv head's query heads
             (1, with GQA), the sum of the two passes (1).
  A partial sum after block i of r is about √(i/r) of the final (a random walk), so the r block stores weigh
  Σ i/r = (r+1)/2. Hence R_out = 3, R_dq = 3 + (r+1)/2, R_dk = 3 + (r+1)/2 + [GQA], R_dv = R_dk - 1: the reduction
  length enters through r, and the measured error of the plain kernel does grow with it (0.5 u at 16 keys,
  1.0 u at 300, 1.2 u at 2000 for dk).
- The bound is λ · √R · u/√3 with λ = 1.5: each norm is over ≥ 32 elements (one segment of one head dim), whose
  rms fluctuates by about 1/√64 = 12%, so 1.5 is a margin of 4 standard deviations.

Measured on 30 random layouts: per-segment error at most 0.78 u (out), 0.96 u (dq), 1.25 u (dk), 1.26 u (dv),
each 0.55-0.8 of its bound. The dense bf16 reference (softmax in bf16) is off by 0.8-1.65 u over the whole tensor.

Bugs this catches (each checked by breaking the code on purpose): a merge weight 1% low (2.7 u on suffix out
rows), cross-pass dk 1% too large (3.3 u), the merged lse saved in bf16 (2.9 u on dk), the backward reading
the lse in bf16 (2.0 u on dq over the whole tensor), a pass's key gradient dropped (256 u).
"""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg_deepspeed import PrefixGroupLayout
from reference import repeated_prefix_attention
from test_attention import heads, rel_err, run_both

U = torch.finfo(torch.bfloat16).eps / 2  # 2^-8
RMS_PER_STORE = U / math.sqrt(3)
LAMBDA = 1.5
KEY_BLOCK = 512


# Prefixes of at least 16 tokens: in a row over 2-3 keys dS = P(dP - D) is a difference of nearly equal numbers,
# and the kernel's D (from the bf16 out) is off relative to that difference by more than any multiple of u
# (2.3x the bound at prefix 1, suffix 1, for the plain causal kernel as much as for us). The float64 and float32
# tests in test_attention.py cover the tiny layouts.
layouts = st.integers(1, 2).flatmap(
    lambda groups: st.tuples(
        st.lists(st.integers(16, 256), min_size=groups, max_size=groups),
        st.lists(st.lists(st.integers(1, 64), min_size=1, max_size=6), min_size=groups, max_size=groups),
    )
)


def query_block(n: int) -> int:
    """The CPU flash kernel's query block for a call with n queries (FlashAttentionKernel.cpp, qSplitSize)."""
    return 256 if n >= 768 else 64 if n >= 192 else 32


def weighted_block_stores(n: int, block: int) -> float:
    r = math.ceil(n / block)
    return (r + 1) / 2


def rounding_bounds(layout: PrefixGroupLayout, grouped_query_heads: bool) -> dict[str, float]:
    """λ · √R · u/√3 for out, dq, dk, dv (R as in the module docstring), the longest reduction of the layout."""
    plan = layout.plan
    longest_keys = max(plan.max_causal, plan.max_cross_k)      # keys per query row, either pass
    query_counts = (plan.max_causal, plan.max_cross_q)         # queries per key row: causal, cross pass
    kv_blocks = max(weighted_block_stores(n, query_block(n)) for n in query_counts)
    stores = {
        "out": 3,
        "dq": 3 + weighted_block_stores(longest_keys, KEY_BLOCK),
        "dk": 3 + kv_blocks + grouped_query_heads,
        "dv": 2 + kv_blocks + grouped_query_heads,
    }
    return {name: LAMBDA * math.sqrt(r) * RMS_PER_STORE for name, r in stores.items()}


def worst_segment_error(ours: torch.Tensor, exact: torch.Tensor, cu_seqlens: torch.Tensor) -> float:
    """max over packed segments (each prefix, each suffix) of ‖ours - exact‖ / ‖exact‖ on that segment.

    A segment whose exact value is much smaller than the tensor's (a 1-token prefix has dq = 0) is measured
    against the tensor's rms scale instead, so cancellation to zero does not read as an infinite error.
    """
    ours, scale = ours.double(), exact.norm() / math.sqrt(exact.numel())
    offsets = cu_seqlens.tolist()
    worst = 0.0
    for a, b in zip(offsets[:-1], offsets[1:]):
        floor = scale * math.sqrt(exact[a:b].numel())
        worst = max(worst, ((ours[a:b] - exact[a:b]).norm() / max(exact[a:b].norm(), floor)).item())
    return worst


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts, heads=heads, d=st.sampled_from([32, 64]), seed=st.integers(0, 2**16))
def test_bfloat16_out_and_grads_within_rounding_bound_per_segment(layout, heads, d, seed):
    """Per segment, out/dq/dk/dv in bf16 are within λ·√R·u/√3 of float64 (derivation in the module docstring)."""
    prefix, suffix = layout
    plan = PrefixGroupLayout.from_lengths(prefix, suffix)
    bounds = rounding_bounds(plan, grouped_query_heads=heads[0] > heads[1])
    ours, exact = run_both(prefix, suffix, *heads, d, torch.bfloat16, seed)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, exact):
        error = worst_segment_error(a, b, plan.cu_seqlens)
        assert error <= bounds[name], f"{name}: {error / U:.2f} u > bound {bounds[name] / U:.2f} u"


def test_bfloat16_out_and_grads_no_worse_than_dense_bfloat16_attention():
    """Over the whole tensor, ours is within one store's rms (u/√3) of the dense bf16 attention's own error.

    The hard cases: a 1-token suffix, a single-member group, many members, GQA.
    """
    prefix, suffix = [200, 16, 40], [[30, 1, 50, 9], [7], [12, 3, 1]]
    dense_bf16 = lambda q, k, v, _: repeated_prefix_attention(q, k, v, prefix, suffix)
    for seed in range(2):
        ours, exact = run_both(prefix, suffix, 4, 2, 64, torch.bfloat16, seed)
        dense, _ = run_both(prefix, suffix, 4, 2, 64, torch.bfloat16, seed, attention=dense_bf16)
        for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, exact, dense):
            ours_error, dense_error = rel_err(a.double(), b), rel_err(c.double(), b)
            assert ours_error <= dense_error + RMS_PER_STORE, (
                f"{name}: {ours_error / U:.2f} u, dense bf16 attention {dense_error / U:.2f} u"
            )
