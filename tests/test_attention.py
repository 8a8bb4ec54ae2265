"""prefix_grouper_attention against the repeated-prefix reference: outputs and gradients, random layouts."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg_deepspeed import PrefixGroupLayout, prefix_grouper_attention
from pg_deepspeed.attention import BACKENDS, cpu
from reference import repeated_prefix_attention


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def run_both(prefix, suffix, hq, hkv, d, dtype, seed=0, attention=None):
    """(ours, reference) as (out, dq, dk, dv) for the same inputs and output gradient."""
    torch.manual_seed(seed)
    layout = PrefixGroupLayout.from_lengths(prefix, suffix)
    T = layout.num_tokens
    q = torch.randn(T, hq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(T, hkv, d, dtype=dtype, requires_grad=True)
    v = torch.randn(T, hkv, d, dtype=dtype, requires_grad=True)
    attention = attention or (lambda q, k, v, layout: prefix_grouper_attention(q, k, v, layout, backend="cpu"))
    ours = attention(q, k, v, layout)
    dout = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (q, k, v), dout)
    ref = repeated_prefix_attention(q.double(), k.double(), v.double(), prefix, suffix)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    return (ours, *ours_grads), (ref, *ref_grads)


layouts = st.integers(1, 4).flatmap(
    lambda groups: st.tuples(
        st.lists(st.integers(1, 300), min_size=groups, max_size=groups),
        st.lists(st.lists(st.integers(1, 100), min_size=1, max_size=8), min_size=groups, max_size=groups),
    )
)
heads = st.sampled_from([(4, 4), (4, 2), (4, 1), (2, 1), (8, 2)])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts, heads=heads, d=st.sampled_from([32, 64, 128]), seed=st.integers(0, 2**16))
def test_float64_matches_reference_within_1e_10(layout, heads, d, seed):
    ours, ref = run_both(*layout, *heads, d, torch.float64, seed)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert rel_err(a, b) <= 1e-10, name


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts, heads=heads, d=st.sampled_from([32, 64, 128]), seed=st.integers(0, 2**16))
def test_float32_matches_reference_within_1e_5(layout, heads, d, seed):
    ours, ref = run_both(*layout, *heads, d, torch.float32, seed)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert rel_err(a.double(), b) <= 1e-5, name


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts, heads=heads, single=st.booleans(), seed=st.integers(0, 2**16))
def test_attention_sinks_match_reference_outputs_and_gradients_within_1e_10(layout, heads, single, seed):
    """gpt-oss's sinks: one more logit per head in every softmax denominator, with its own gradient."""
    prefix, suffix = layout
    if single:
        suffix = [[s[0]] for s in suffix]
    torch.manual_seed(seed)
    hq, hkv = heads
    L = PrefixGroupLayout.from_lengths(prefix, suffix)
    q = torch.randn(L.num_tokens, hq, 32, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(L.num_tokens, hkv, 32, dtype=torch.float64, requires_grad=True) for _ in range(2))
    sinks = (3 * torch.randn(hq, dtype=torch.float64)).requires_grad_()
    ours = prefix_grouper_attention(q, k, v, L, backend="cpu", sinks=sinks)
    ref = repeated_prefix_attention(q, k, v, prefix, suffix, sinks=sinks)
    dout = torch.randn_like(ours)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dsinks"), (ours, *torch.autograd.grad(ours, (q, k, v, sinks), dout)),
                          (ref, *torch.autograd.grad(ref, (q, k, v, sinks), dout))):
        assert rel_err(a, b) <= 1e-10, name
    without = prefix_grouper_attention(q, k, v, L, backend="cpu")
    assert rel_err(without, ours) > 1e-3  # the sinks matter at this size


def test_sinks_of_the_wrong_shape_are_refused():
    layout, q, k, v = layout_and_qkv()
    with pytest.raises(ValueError, match=r"sinks must be a floating \[Hq\] = \[4\]"):
        prefix_grouper_attention(q, k, v, layout, sinks=torch.zeros(2))


class CountingBackend:
    """A backend module passed through unchanged, recording each kernel call: (direction, causal, cu_q, cu_k)."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def available(self, device, dtype):
        return self.module.available(device, dtype)

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        self.calls.append(("forward", causal, cu_q.tolist(), cu_k.tolist()))
        return self.module.forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        self.calls.append(("backward", causal, cu_q.tolist(), cu_k.tolist()))
        return self.module.backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale)


def test_single_member_groups_take_one_causal_pass_over_each_prefix_and_suffix(monkeypatch):
    """The standard forward (every group of size 1): one causal kernel call each way, one sequence per
    [prefix ; suffix], and no cross pass."""
    backend = CountingBackend(BACKENDS["cpu"])
    monkeypatch.setitem(BACKENDS, "cpu", backend)
    run_both([70, 3, 150], [[20], [1], [64]], 4, 2, 32, torch.float64)
    whole_sequences = [0, 70 + 20, 90 + 3 + 1, 94 + 150 + 64]
    assert backend.calls == [("forward", True, whole_sequences, whole_sequences),
                             ("backward", True, whole_sequences, whole_sequences)]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_single_member_groups_match_reference(dtype, tol):
    ours, ref = run_both([70, 3, 150], [[20], [1], [64]], 4, 2, 32, dtype)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert rel_err(a.double(), b) <= tol, name


def test_prefix_rows_equal_for_every_member_count():
    """The prefix outputs do not depend on how many members share it."""
    torch.manual_seed(1)
    one = PrefixGroupLayout.from_lengths([40], [[5]])
    many = PrefixGroupLayout.from_lengths([40], [[5, 9, 2]])
    q = torch.randn(many.num_tokens, 2, 32, dtype=torch.float64)
    out_many = prefix_grouper_attention(q, q, q, many, backend="cpu")
    out_one = prefix_grouper_attention(q[:45], q[:45], q[:45], one, backend="cpu")
    assert torch.allclose(out_many[:45], out_one, rtol=0, atol=1e-12)


def test_suffix_never_sees_other_members():
    """Changing member 2's tokens leaves member 1's outputs bit-for-bit unchanged."""
    torch.manual_seed(2)
    layout = PrefixGroupLayout.from_lengths([10], [[4, 6]])
    x = torch.randn(layout.num_tokens, 2, 16, dtype=torch.float64)
    y = x.clone()
    y[14:] += 1.0
    a = prefix_grouper_attention(x, x, x, layout, backend="cpu")
    b = prefix_grouper_attention(y, y, y, layout, backend="cpu")
    assert torch.equal(a[:14], b[:14])
    assert not torch.allclose(a[14:], b[14:])


def test_bfloat16_error_no_larger_than_dense_bfloat16_attention():
    torch.manual_seed(3)
    prefix, suffix = [200, 64], [[30, 12, 50], [7, 7]]
    layout = PrefixGroupLayout.from_lengths(prefix, suffix)
    q, k, v = (torch.randn(layout.num_tokens, 4, 64) for _ in range(3))
    exact = repeated_prefix_attention(q.double(), k.double(), v.double(), prefix, suffix)
    ours = prefix_grouper_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout, backend="cpu")
    dense = repeated_prefix_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), prefix, suffix)
    assert rel_err(ours.double(), exact) <= 2 * rel_err(dense.double(), exact)


def test_cpu_matmul_path_matches_fused_kernel():
    """cpu.py's non-CPU-device path (plain matmuls) agrees with the fused CPU kernel, forward and backward."""
    torch.manual_seed(4)
    q, k, v, dout = (torch.randn(1, 4, 37, 32, dtype=torch.float64) for _ in range(4))
    for causal in (True, False):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=0.2)
        m_out, m_lse = cpu._math_forward(q, k, v, causal, 0.2)
        assert torch.allclose(m_out, out, atol=1e-12) and torch.allclose(m_lse, lse, atol=1e-12)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=0.2
        )
        for a, b in zip(cpu._math_backward(dout, q, k, v, out, lse, causal, 0.2), grads):
            assert torch.allclose(a, b, atol=1e-12)


# ---------------------------------------------------------------- bad input
def layout_and_qkv(hq=4, hkv=2, d=16, dtype=torch.float32):
    layout = PrefixGroupLayout.from_lengths([6, 3], [[2, 2], [1]])
    T = layout.num_tokens
    return layout, torch.randn(T, hq, d, dtype=dtype), torch.randn(T, hkv, d, dtype=dtype), torch.randn(T, hkv, d, dtype=dtype)


def test_rejects_heads_not_divisible():
    layout, q, k, v = layout_and_qkv(hq=3, hkv=2)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key/value heads \(2\)"):
        prefix_grouper_attention(q, k, v, layout)


def test_rejects_token_count_mismatch():
    layout, q, k, v = layout_and_qkv()
    with pytest.raises(ValueError, match=r"q has 13 tokens but the layout packs 14"):
        prefix_grouper_attention(q[:-1], k, v, layout)


def test_rejects_dtype_mismatch():
    layout, q, k, v = layout_and_qkv()
    with pytest.raises(TypeError, match="dtypes differ"):
        prefix_grouper_attention(q, k.double(), v, layout)


def test_rejects_layout_on_other_device():
    layout, q, k, v = layout_and_qkv()
    with pytest.raises(ValueError, match="devices differ"):
        prefix_grouper_attention(q, k, v, layout.to("meta"))


def test_unavailable_backend_says_what_is_missing():
    layout, q, k, v = layout_and_qkv()
    with pytest.raises(RuntimeError, match="backend 'torch' needs CUDA tensors"):
        prefix_grouper_attention(q, k, v, layout, backend="torch")
    with pytest.raises(RuntimeError, match="flash"):
        prefix_grouper_attention(q, k, v, layout, backend="flash_attn")


def test_unknown_backend_is_named():
    layout, q, k, v = layout_and_qkv()
    with pytest.raises(ValueError, match="unknown attention backend 'triton'"):
        prefix_grouper_attention(q, k, v, layout, backend="triton")
