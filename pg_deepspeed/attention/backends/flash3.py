"""Varlen attention through FlashAttention-3 (flash-attn's `hopper/` build: module `flash_attn_interface`).

FA3 is not on PyPI: it is built from flash-attn's repository (`cd hopper && python setup.py install`),
and every build calls itself version 3.0.0, so the version cannot tell its signatures apart. This
backend therefore checks the signatures themselves (`signature_problem`) against the convention read
from `hopper/flash_attn_interface.py` as of commit fde4bc0c (2025-08, ops in namespace `flash_attn_3`,
every argument after q, k, v with a default) through 0f82fead (2026-03):
    _flash_attn_forward(q, k, v, ..., cu_seqlens_q=None, cu_seqlens_k=None, ..., max_seqlen_q=None,
        max_seqlen_k=None, ..., softmax_scale=None, causal=False, window_size_left=-1, ...)
        -> (out, softmax_lse, out_accum, softmax_lse_accum)
    _flash_attn_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, cu_seqlens_k=None, ...,
        max_seqlen_q=None, max_seqlen_k=None, dq=None, dk=None, dv=None, softmax_scale=None,
        is_causal=False, window_size_left=-1, ...) -> softmax_d       (dq, dk, dv written in place)
We call them by keyword. Varlen softmax_lse is float32 [Hq, total_q] (hopper/flash_api.cpp,
mha_fwd); causal masks are aligned bottom-right; GQA is native. The kernels check for sm80 or newer.
The public `flash_attn_varlen_func` is no use here: its backward ignores the lse gradient and cannot
take the merged (out, lse) (read from flash_attn_interface's FlashAttnVarlenFunc: it returns None for lse's
gradient). Same contract as `cpu.py`; `contract.py` checks every result.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from typing import Callable

import torch

from pg_deepspeed.attention.contract import Kernels, check_backward, check_forward, half_on_cuda, probe, returned

NAME = "flash_attn_3"
MODULE = "flash_attn_interface"
# the keywords we pass; every other parameter after (q, k, v) / (dout, q, k, v, out, softmax_lse) must have a default
FORWARD_KEYWORDS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal")
BACKWARD_KEYWORDS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dq", "dk", "dv",
                     "softmax_scale", "is_causal")


def _parameters(fn: Callable) -> list[inspect.Parameter]:
    fn = getattr(fn, "_init_fn", fn)  # torch.library.custom_op wraps the function in a CustomOpDef
    return list(inspect.signature(fn).parameters.values())


def signature_problem(forward: Callable, backward: Callable) -> str | None:
    """What keeps our keyword calls from matching these two kernels' signatures, or None."""
    found = []
    for name, fn, positional, keywords in (("_flash_attn_forward", forward, 3, FORWARD_KEYWORDS),
                                           ("_flash_attn_backward", backward, 6, BACKWARD_KEYWORDS)):
        params = _parameters(fn)
        names = [p.name for p in params]
        missing = [k for k in keywords if k not in names]
        required = [p.name for p in params[positional:] if p.default is inspect.Parameter.empty and p.name not in keywords]
        if missing:
            found.append(f"{name} has no parameter {', '.join(missing)}")
        if required:
            found.append(f"{name} requires {', '.join(required)}")
    if found:
        return (f"backend {NAME!r} is written for FlashAttention-3's interface of 2025-08 or later; the installed "
                f"{MODULE} differs: " + "; ".join(found))
    return None


def bind(label: str, forward: Callable, backward: Callable) -> Kernels:
    """Kernels whose signatures match the convention above; raises naming what differs otherwise."""
    problem = signature_problem(forward, backward)
    if problem is not None:
        raise RuntimeError(problem)
    return Kernels(label, forward, backward)


_kernels: Kernels | None = None


def kernels() -> Kernels:
    """The installed FA3 kernels, imported on first use."""
    global _kernels
    if _kernels is None:
        iface = importlib.import_module(MODULE)
        _kernels = bind(f"{MODULE} (FlashAttention-3)", iface._flash_attn_forward, iface._flash_attn_backward)
    return _kernels


@functools.lru_cache(maxsize=None)
def _import_problem() -> str | None:
    if importlib.util.find_spec(MODULE) is None:
        return (f"backend {NAME!r} needs FlashAttention-3 (module {MODULE}), built from flash-attn's "
                "hopper/ directory")
    if torch.version.hip is not None:
        return f"backend {NAME!r} is not written for ROCm (HIP {torch.version.hip}); its FA3 is a different kernel"
    try:
        kernels()
    except Exception as error:  # an ABI mismatch, or a signature we were not written for
        return f"backend {NAME!r}: {error}"
    return None


def available(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when this backend can run; otherwise why not."""
    return half_on_cuda(NAME, probe(device), dtype) or _import_problem()


def forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    kn = kernels()
    q, k, v = (x.contiguous() for x in (q, k, v))
    result = kn.forward(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                        max_seqlen_q=max_q, max_seqlen_k=max_k, softmax_scale=scale, causal=causal)
    out, lse, _out_accum, _lse_accum = returned(result, 4, NAME, kn.label, "forward")
    return check_forward(NAME, kn.label, q, out, lse)


def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    kn = kernels()
    dout, q, k, v, out = (x.contiguous() for x in (dout, q, k, v, out))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kn.backward(dout, q, k, v, out, lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                max_seqlen_k=max_k, dq=dq, dk=dk, dv=dv, softmax_scale=scale, is_causal=causal)
    return check_backward(NAME, kn.label, q, k, v, dq, dk, dv)
