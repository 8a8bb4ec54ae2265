"""GPU conformance: every backend that can run on this GPU against the `cpu` backend, outputs and gradients.

Marked `cuda` and skipped (with the reason) where torch sees no GPU. `make gpu-check` runs them first on
any GPU machine and writes the figures docs/performance.md quotes (set PG_GPU_FIGURES to a .jsonl path to record).

The exact answer is the `cpu` backend on CPU in float64 (itself tested against tests/reference.py to 1e-10),
fed the same (rounded) inputs. Tolerances:
  float32   rel err <= 1e-5, TF32 off (only the `cpu` backend's matmul path runs: the kernels need fp16/bf16)
  bfloat16  rel err <= 2 x the same backend's error on the same inputs without prefix sharing (each member
            as its own [prefix ; suffix] through the same kernel) + 1e-3, and never above 3e-2: prefix
            sharing may cost at most one more rounding than the standard forward.
"""
import functools
import json
import os

import pytest
import torch

from pg_deepspeed import PrefixGroupLayout, prefix_grouper_attention
from pg_deepspeed.attention import BACKENDS, cpu, resolve_backend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none (make gpu-check)"),
]

CUDA = torch.device("cuda")
HEAD_DIMS = (64, 128, 256)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def random_case(seed: int, max_groups: int = 3, max_members: int = 8):
    """Random layout with odd and even lengths, 1-token segments allowed: (prefix, suffix)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))
    groups = rand(1, max_groups)
    prefix = [rand(1, 777) for _ in range(groups)]
    suffix = [[rand(1, 301) for _ in range(rand(1, max_members))] for _ in range(groups)]
    return prefix, suffix


# (prefix lengths, suffix lengths per group, Hq, Hkv)
CASES = {
    "random0-gqa": (*random_case(0), 8, 2),
    "random1-mha": (*random_case(1), 4, 4),
    "random2-mqa": (*random_case(2), 8, 1),
    "G1-gqa": ([513, 7, 130], [[65], [1], [255]], 8, 2),
    "tiny-segments": ([1, 2], [[1, 1, 3], [1]], 4, 2),
    "long-prefix": ([4099], [[129, 3, 257, 64]], 16, 4),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def ungrouped_index(prefix, suffix):
    """How to lay the grouped batch out with no prefix sharing: every member its own [prefix ; suffix].

    Returns (rows of the grouped batch in that order, 1.0 where a row carries the output gradient (a prefix
    row only in the first member, whose output the grouped batch reports), the plain layout's lengths).
    """
    index, carries, plain_prefix, plain_suffix, at = [], [], [], [], 0
    for p, members in zip(prefix, suffix):
        pre, at = list(range(at, at + p)), at + p
        for i, s in enumerate(members):
            index += pre + list(range(at, at + s))
            carries += [1.0 if i == 0 else 0.0] * p + [1.0] * s
            plain_prefix.append(p)
            plain_suffix.append([s])
            at += s
    return torch.tensor(index), torch.tensor(carries), plain_prefix, plain_suffix


def run(backend: str, q, k, v, dout, layout):
    """(out, dq, dk, dv) of prefix_grouper_attention with `backend`."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = prefix_grouper_attention(q, k, v, layout, backend=backend)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def run_ungrouped(backend: str, q, k, v, dout, prefix, suffix):
    """The same backend with no prefix sharing: each member's [prefix ; suffix] as its own sequence."""
    index, carries, plain_prefix, plain_suffix = ungrouped_index(prefix, suffix)
    index, carries = index.to(q.device), carries.to(q.device, q.dtype)
    plain = PrefixGroupLayout.from_lengths(plain_prefix, plain_suffix, device=q.device)
    out, dq, dk, dv = run(backend, q[index], k[index], v[index], dout[index] * carries[:, None, None], plain)
    fold = lambda g, like: torch.zeros(like.shape, dtype=torch.float64, device=g.device).index_add(0, index, g.double())
    # every copy of a prefix row has the same output; index_copy keeps one of them
    out_rows = torch.zeros(q.shape, dtype=torch.float64, device=q.device).index_copy(0, index, out.double())
    return out_rows, fold(dq, q), fold(dk, k), fold(dv, v)


@functools.lru_cache(maxsize=4)
def inputs(case: str, d: int, dtype_name: str):
    """(q, k, v, dout) on the GPU for one case, the same for every backend."""
    prefix, suffix, hq, hkv = CASES[case]
    T = sum(prefix) + sum(map(sum, suffix))
    torch.manual_seed(1000 * sorted(CASES).index(case) + d)
    shapes = [(T, hq, d), (T, hkv, d), (T, hkv, d), (T, hq, d)]
    return tuple(torch.randn(shape, device=CUDA).to(DTYPES[dtype_name]) for shape in shapes)


@functools.lru_cache(maxsize=4)
def exact_answer(case: str, d: int, dtype_name: str):
    """The cpu backend on CPU in float64, fed the same rounded inputs: (out, dq, dk, dv)."""
    prefix, suffix, _, _ = CASES[case]
    return run("cpu", *(x.double().cpu() for x in inputs(case, d, dtype_name)),
               PrefixGroupLayout.from_lengths(prefix, suffix))


def record(**figures) -> None:
    path = os.environ.get("PG_GPU_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(figures) + "\n")


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("backend", list(BACKENDS))  # innermost: the cached inputs and exact answer are reused
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_backend_on_gpu_matches_cpu_backend(backend, dtype_name, d, case):
    dtype = DTYPES[dtype_name]
    reason = BACKENDS[backend].available(CUDA, dtype)
    if reason is not None:
        pytest.skip(reason)
    prefix, suffix, _, _ = CASES[case]
    q, k, v, dout = inputs(case, d, dtype_name)
    layout = PrefixGroupLayout.from_lengths(prefix, suffix, device=CUDA)
    ours = run(backend, q, k, v, dout, layout)
    exact = exact_answer(case, d, dtype_name)
    if dtype == torch.float32:
        bounds = [1e-5] * 4
    else:
        plain = run_ungrouped(backend, q, k, v, dout, prefix, suffix)
        bounds = [min(2 * rel_err(p, e) + 1e-3, 3e-2) for p, e in zip(plain, exact)]
    for name, a, b, bound in zip(("out", "dq", "dk", "dv"), ours, exact, bounds):
        err = rel_err(a, b)
        record(backend=backend, dtype=dtype_name, d=d, case=case, tensor=name, rel_err=err, bound=bound)
        assert err <= bound, f"{backend} {dtype_name} d={d} {case}: {name} rel err {err:.2e} > {bound:.2e}"


def test_auto_takes_a_fused_kernel_in_bfloat16_on_sm80_or_newer():
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0) or torch.version.hip:
        pytest.skip(f"compute capability {capability}, HIP {torch.version.hip}: no fused backend is declared here")
    chosen = resolve_backend("auto", CUDA, torch.bfloat16)
    record(auto_bfloat16=chosen.__name__.rsplit(".", 1)[-1])
    assert chosen is not cpu


def test_auto_in_float32_on_cuda_warns_about_the_slow_loop(monkeypatch):
    import pg_deepspeed.attention as attention
    monkeypatch.setattr(attention, "_warned_slow", set())
    with pytest.warns(RuntimeWarning, match="falls back to backend 'cpu'"):
        assert resolve_backend("auto", CUDA, torch.float32) is cpu


# (parents, lengths, Hq, Hkv): depth 3, a fused chain, a wide node, two roots
TREES = {"depth3-gqa": ([-1, 0, 1, 1, 0, 4, 4, 4, -1, 8], [517, 33, 9, 1, 128, 65, 3, 200, 300, 7], 8, 2)}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("tree", sorted(TREES))
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_tree_with_sinks_on_gpu_matches_cpu_backend(backend, dtype_name, tree):
    """Trees send a row through the cross pass once per ancestor run, and sinks enter last: both on the kernels.

    bfloat16 bound: 2 x the error of the dense per-path reference run in bfloat16 on the GPU, + 1e-3, <= 3e-2.
    """
    from pg_deepspeed import PrefixTreeLayout
    from reference import tree_path_attention

    dtype = DTYPES[dtype_name]
    reason = BACKENDS[backend].available(CUDA, dtype)
    if reason is not None:
        pytest.skip(reason)
    parents, lengths, hq, hkv = TREES[tree]
    layout = PrefixTreeLayout.from_parents(parents, lengths)
    torch.manual_seed(7)
    T, d = layout.num_tokens, 128
    q, dout = (torch.randn(T, hq, d, device=CUDA).to(dtype) for _ in range(2))
    k, v = (torch.randn(T, hkv, d, device=CUDA).to(dtype) for _ in range(2))
    sinks = torch.randn(hq, device=CUDA)

    def grads(fn, *xs):
        xs = [x.detach().requires_grad_() for x in xs]
        out = fn(*xs)
        return (out, *torch.autograd.grad(out, xs, dout.to(out.dtype)))

    ours = grads(lambda q, k, v, s: prefix_grouper_attention(q, k, v, layout.to(CUDA), backend=backend, sinks=s),
                 q, k, v, sinks)
    exact = grads(lambda q, k, v, s: prefix_grouper_attention(q, k, v, layout, backend="cpu", sinks=s),
                  *(x.double().cpu() for x in (q, k, v, sinks)))
    if dtype == torch.float32:
        bounds = [1e-5] * 5
    else:
        dense = grads(lambda q, k, v, s: tree_path_attention(q, k, v, parents, lengths, None, s), q, k, v, sinks)
        bounds = [min(2 * rel_err(p, e) + 1e-3, 3e-2) for p, e in zip(dense, exact)]
    for name, a, b, bound in zip(("out", "dq", "dk", "dv", "dsinks"), ours, exact, bounds):
        err = rel_err(a, b)
        record(backend=backend, dtype=dtype_name, d=d, case=f"tree-{tree}-sinks", tensor=name, rel_err=err, bound=bound)
        assert err <= bound, f"{backend} {dtype_name} tree {tree}: {name} rel err {err:.2e} > {bound:.2e}"
