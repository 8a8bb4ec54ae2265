"""The GPU backends without a GPU: our calling code through each declared kernel version's contract double,
the version and device gates, the checks on what kernels return, and what `auto` does on CUDA.

The doubles (tests/doubles.py) restate each kernel's signature and semantics in dense float64 torch; they are
not the kernels. What only a GPU can show is in tests/test_gpu_conformance.py (`make gpu-check`).
"""
import warnings

import pytest
import torch

import doubles
import pg_deepspeed.attention as attention
from pg_deepspeed import PrefixGroupLayout, PrefixTreeLayout
from pg_deepspeed.attention import cpu, flash, flash3, resolve_backend, torch_cuda
from pg_deepspeed.attention.contract import DeviceFacts, KernelContractError
from pg_deepspeed.attention.function import PrefixGroupedAttention
from reference import tree_path_attention
from test_attention import rel_err, run_both

# every declared calling convention: (backend module, version or label, forward double, backward double)
DECLARED = {
    "flash_attn-2.6.0": (flash, "2.6.0", doubles.flash_attn_26_varlen_forward, doubles.flash_attn_26_varlen_backward),
    "flash_attn-2.6.3": (flash, "2.6.3", doubles.flash_attn_26_varlen_forward, doubles.flash_attn_26_varlen_backward),
    "flash_attn-2.7.0": (flash, "2.7.0", doubles.flash_attn_27_varlen_forward, doubles.flash_attn_27_varlen_backward),
    "flash_attn-2.8.3": (flash, "2.8.3", doubles.flash_attn_27_varlen_forward, doubles.flash_attn_27_varlen_backward),
    "flash_attn_3": (flash3, "FA3 double", doubles.fa3_forward, doubles.fa3_backward),
    "torch": (torch_cuda, "torch double", doubles.aten_flash_attention_forward, doubles.aten_flash_attention_backward),
}
SM90 = DeviceFacts("cuda", (9, 0), None)


def use_doubles(monkeypatch, declared: str, forward=None, backward=None):
    """Bind the backend of `declared` to its doubles (or to the given replacements); returns the module."""
    module, version, fwd, bwd = DECLARED[declared]
    monkeypatch.setattr(module, "_kernels", module.bind(version, forward or fwd, backward or bwd))
    return module


def through(module):
    return lambda q, k, v, layout: PrefixGroupedAttention.apply(q, k, v, layout.plan, module, q.shape[-1] ** -0.5)


# ---------------------------------------------------------------- our calls, exact through every declared contract
@pytest.mark.parametrize("declared", sorted(DECLARED))
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("suffix", [[[5, 1, 17], [9], [40, 3]], [[5], [9], [40]]], ids=["grouped", "single"])
def test_gpu_backend_calls_match_reference_through_contract_double(declared, heads, suffix, monkeypatch):
    """Our calls into the flash kernels (cu_seqlens, lse layout, merged out/lse in backward) are exact.

    The contract's lse is float32, so float64 inputs agree to float32 precision of the merge weights.
    """
    module = use_doubles(monkeypatch, declared)
    ours, ref = run_both([33, 8, 120], suffix, *heads, 64, torch.float64, attention=through(module))
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert rel_err(a, b) <= 1e-6, name


@pytest.mark.parametrize("declared", sorted(DECLARED))
def test_a_tree_with_sinks_is_exact_through_every_declared_contract(declared, monkeypatch):
    """Depth 3, a fused chain, a row that is a cross query once per ancestor run, and sinks, through the doubles."""
    module = use_doubles(monkeypatch, declared)
    parents, lengths = [-1, 0, 1, 1, 0, 4, -1, 6], [37, 9, 5, 1, 12, 3, 20, 4]
    layout = PrefixTreeLayout.from_parents(parents, lengths)
    torch.manual_seed(0)
    q = torch.randn(layout.num_tokens, 4, 64, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(layout.num_tokens, 2, 64, dtype=torch.float64, requires_grad=True) for _ in range(2))
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(layout.num_tokens, 4, 64, dtype=torch.float64)
    ours = PrefixGroupedAttention.apply(q, k, v, layout.plan, module, 0.125, sinks)
    ref = tree_path_attention(q, k, v, parents, lengths, 0.125, sinks)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dsinks"), (ours, *torch.autograd.grad(ours, (q, k, v, sinks), dout)),
                          (ref, *torch.autograd.grad(ref, (q, k, v, sinks), dout))):
        assert rel_err(a, b) <= 1e-6, name


@pytest.mark.parametrize("declared", sorted(DECLARED))
def test_strided_inputs_are_made_contiguous_before_the_kernels(declared, monkeypatch):
    """q, k, v as transposed views ([H, T, D] storage, as a model's attention hands them) are not a contract break."""
    module = use_doubles(monkeypatch, declared)
    layout = PrefixGroupLayout.from_lengths([9, 4], [[3, 1], [5]])
    q, k, v = (torch.randn(h, layout.num_tokens, 16, dtype=torch.float64).transpose(0, 1).requires_grad_()
               for h in (4, 2, 2))
    assert not q.is_contiguous()
    out = through(module)(q, k, v, layout)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    same = through(cpu)(*(x.detach().contiguous().requires_grad_() for x in (q, k, v)), layout)
    assert rel_err(out, same) <= 1e-6 and all(g.shape == x.shape for g, x in zip(grads, (q, k, v)))


# ---------------------------------------------------------------- flash-attn versions
@pytest.mark.parametrize("version, convention", [
    ("2.6.0", "2.6"), ("2.6.3", "2.6"), ("2.7.0", "2.7"), ("2.7.0.post2", "2.7"), ("2.7.4.post1", "2.7"),
    ("2.8.3", "2.7"), ("2.5.9.post1", None), ("2.9.0", None), ("3.0.0b1", None), ("not-a-version", None),
])
def test_flash_attn_version_selects_its_calling_convention(version, convention):
    assert flash.calling_convention(version) == convention


@pytest.mark.parametrize("version", ["2.5.9", "2.9.0"])
def test_flash_attn_refuses_undeclared_versions_naming_the_installed_one(version):
    reason = flash.decide(version, SM90, torch.bfloat16)
    assert f"flash-attn {version} is installed" in reason and "2.6.0 to 2.8.x" in reason
    with pytest.raises(RuntimeError, match=f"supports flash-attn 2.6.0 to 2.8.x, got {version}"):
        flash.bind(version, doubles.flash_attn_27_varlen_forward, doubles.flash_attn_27_varlen_backward)


def test_flash_attn_decision_without_the_package_and_on_a_capable_gpu():
    assert "pip install 'pg_deepspeed[flash]'" in flash.decide(None, SM90, torch.bfloat16)
    assert flash.decide("2.7.4", SM90, torch.bfloat16) is None
    assert "compute capability 8.0 or newer, this GPU has 7.5" in flash.decide(
        "2.7.4", DeviceFacts("cuda", (7, 5), None), torch.float16)


@pytest.mark.parametrize("version, other", [("2.6.3", "flash_attn-2.7.0"), ("2.8.3", "flash_attn-2.6.3")])
def test_each_flash_attn_convention_fails_through_the_other_conventions_double(version, other, monkeypatch):
    """The doubles tell the conventions apart, so the exactness test above checks each adapter's own calls."""
    _, _, forward, backward = DECLARED[other]
    monkeypatch.setattr(flash, "_kernels", flash.bind(version, forward, backward))
    with pytest.raises((AssertionError, TypeError, KernelContractError)):
        run_both([6], [[2, 3]], 2, 2, 16, torch.float64, attention=through(flash))


def test_a_kernel_returning_another_number_of_values_fails_naming_version(monkeypatch):
    module = use_doubles(monkeypatch, "torch", forward=lambda *a, **kw: (*doubles.aten_flash_attention_forward(*a, **kw), None))
    with pytest.raises(KernelContractError, match=r"'torch' \(torch double\) broke its kernel contract in forward: "
                                                  r"the kernel returned 6 values, expected 5"):
        run_both([6], [[2, 3]], 2, 2, 16, torch.float64, attention=through(module))


# ---------------------------------------------------------------- the torch backend's refusals
@pytest.mark.parametrize("facts, dtype, built, reason", [
    (DeviceFacts("cpu", None, None), torch.bfloat16, True, "needs CUDA tensors, got device cpu"),
    (SM90, torch.float32, True, "needs float16 or bfloat16, got torch.float32"),
    (DeviceFacts("cuda", None, None), torch.bfloat16, True, "needs a CUDA GPU, but torch sees none"),
    (DeviceFacts("cuda", (7, 5), None), torch.float16, True, "compute capability 8.0 or newer, this GPU has 7.5"),
    (DeviceFacts("cuda", (9, 4), "6.2.41133"), torch.bfloat16, True, "refused on ROCm (HIP 6.2.41133)"),
    (SM90, torch.bfloat16, False, "needs a PyTorch build with CUDA flash attention"),
])
def test_torch_backend_refuses_what_its_kernel_cannot_do(facts, dtype, built, reason):
    assert reason in torch_cuda.decide(facts, dtype, built)


def test_torch_backend_runs_on_sm80_and_newer_in_half_precision():
    for capability in [(8, 0), (8, 6), (9, 0), (10, 0)]:
        for dtype in (torch.float16, torch.bfloat16):
            assert torch_cuda.decide(DeviceFacts("cuda", capability, None), dtype, True) is None


# ---------------------------------------------------------------- FlashAttention-3's interface
def fa3_backward_of_july_2025(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k,
                              max_seqlen_q, max_seqlen_k, dq, dk, dv, softmax_scale, causal, window_size=(-1, -1),
                              softcap=0.0, deterministic=False, sm_margin=0):
    """Signature double of hopper/flash_attn_interface.py before fde4bc0c: `causal`, no defaults."""
    raise AssertionError("never called")


def test_flash_attn_3_accepts_the_declared_interface_and_names_what_differs_otherwise():
    assert flash3.signature_problem(doubles.fa3_forward, doubles.fa3_backward) is None
    problem = flash3.signature_problem(doubles.fa3_forward, fa3_backward_of_july_2025)
    assert "_flash_attn_backward has no parameter is_causal" in problem
    assert "_flash_attn_backward requires sequed_q, sequed_k, causal" in problem
    with pytest.raises(RuntimeError, match="interface of 2025-08 or later"):
        flash3.bind("FA3", doubles.fa3_forward, fa3_backward_of_july_2025)


def test_flash_attn_3_says_what_is_missing(monkeypatch):
    assert "needs CUDA tensors" in flash3.available(torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(flash3, "probe", lambda device: SM90)
    assert "needs FlashAttention-3 (module flash_attn_interface)" in flash3.available(
        torch.device("cuda"), torch.bfloat16)


# ---------------------------------------------------------------- what kernels return is checked
def torch_double_with(lse_fix):
    def forward(*args, **kwargs):
        out, lse, *rest = doubles.aten_flash_attention_forward(*args, **kwargs)
        return (out, lse_fix(lse, args[3]), *rest)
    return forward


def padded(lse, cu_seqlens):
    """The pre-2.6 / ROCm lse layout [B, H, max_seqlen] (a broken-contract double)."""
    lengths = cu_seqlens.diff().tolist()
    out = torch.full((len(lengths), lse.shape[0], max(lengths)), float("inf"))
    for b, (start, n) in enumerate(zip(cu_seqlens.tolist(), lengths)):
        out[b, :, :n] = lse[:, start:start + n]
    return out


@pytest.mark.parametrize("lse_fix, message", [
    (padded, r"lse has shape \(3, 4, 160\), expected \(4, 215\)"),
    (lambda lse, cu: lse.bfloat16(), r"lse has dtype torch.bfloat16, expected torch.float32"),
    (lambda lse, cu: lse.t().contiguous().t(), r"lse is not contiguous"),
], ids=["padded-lse", "bf16-lse", "strided-lse"])
def test_a_kernel_breaking_its_contract_fails_naming_backend_version_and_difference(lse_fix, message, monkeypatch):
    module = use_doubles(monkeypatch, "torch", forward=torch_double_with(lse_fix))
    with pytest.raises(KernelContractError, match=r"'torch' \(torch double\) broke its kernel contract in forward: "
                                                  + message):
        run_both([33, 8, 120], [[5], [9], [40]], 4, 2, 64, torch.float64, attention=through(module))


def test_the_cross_pass_result_is_checked_too(monkeypatch):
    """The cross pass (causal=False) is a call site of its own: a contract break there fails as well."""
    def forward(*args, **kwargs):
        out, lse, *rest = doubles.aten_flash_attention_forward(*args, **kwargs)
        return (out, lse if args[8] else lse.half(), *rest)
    module = use_doubles(monkeypatch, "torch", forward=forward)
    with pytest.raises(KernelContractError, match=r"lse has dtype torch.float16"):
        run_both([33, 8], [[5, 1], [9, 2]], 4, 2, 64, torch.float64, attention=through(module))


def test_a_backward_returning_unreduced_gqa_gradients_fails(monkeypatch):
    def backward(*args, **kwargs):
        dq, dk, dv = doubles.aten_flash_attention_backward(*args, **kwargs)
        return dq, dk.repeat_interleave(2, 1), dv
    module = use_doubles(monkeypatch, "torch", backward=backward)
    with pytest.raises(KernelContractError, match=r"in backward: dk has shape \(74, 4, 64\), expected \(74, 2, 64\)"):
        run_both([33, 8], [[5, 1], [9, 18]], 4, 2, 64, torch.float64, attention=through(module))


# ---------------------------------------------------------------- auto on CUDA
@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(attention, "_warned_slow", set())


def test_auto_on_cuda_float32_warns_once_that_it_runs_the_slow_loop(fresh_warnings):
    cuda = torch.device("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_backend("auto", cuda, torch.float32) is cpu
        assert resolve_backend("auto", cuda, torch.float32) is cpu
    slow = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(slow) == 1
    text = str(slow[0].message)
    assert "'auto' on cuda with torch.float32 falls back to backend 'cpu'" in text
    assert "Load the model in bfloat16 or float16" in text and "got torch.float32" in text


def test_auto_on_cpu_does_not_warn(fresh_warnings):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", torch.device("cpu"), torch.float32) is cpu


def probe_as(monkeypatch, facts: DeviceFacts, flash_built: bool = True):
    for module in (flash, flash3, torch_cuda):
        monkeypatch.setattr(module, "probe", lambda device: facts)
    monkeypatch.setattr(torch_cuda, "_flash_built", lambda: flash_built)


@pytest.mark.parametrize("facts, reason", [
    (DeviceFacts("cuda", (7, 5), None), "this GPU has 7.5"),
    (DeviceFacts("cuda", (9, 4), "6.2.41133"), "refused on ROCm"),
], ids=["sm75", "rocm"])
def test_auto_falls_through_gpus_the_kernels_refuse_and_says_why(facts, reason, monkeypatch, fresh_warnings):
    probe_as(monkeypatch, facts)
    with pytest.warns(RuntimeWarning, match=reason):
        assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) is cpu
    with pytest.raises(RuntimeError, match=reason):
        resolve_backend("torch", torch.device("cuda"), torch.bfloat16)


def test_auto_on_an_sm80_gpu_in_bf16_takes_a_fused_kernel_silently(monkeypatch, fresh_warnings):
    probe_as(monkeypatch, DeviceFacts("cuda", (8, 0), None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) is torch_cuda


def test_backend_names_reach_the_registry():
    assert list(attention.BACKENDS) == ["flash_attn_3", "flash_attn", "torch", "cpu"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: make gpu-check runs for real")
def test_gpu_check_without_a_gpu_stops_loudly_and_writes_nothing(tmp_path, capsys):
    from benchmarks import gpu_check
    assert gpu_check.main(["--report", str(tmp_path / "gpu-check.md"), "--out", str(tmp_path / "gpu")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
