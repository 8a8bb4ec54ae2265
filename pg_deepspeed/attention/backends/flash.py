"""Varlen attention through the flash-attn package (FlashAttention-2), versions 2.6.0 to 2.8.x.

Two calling conventions, read from `flash_attn/flash_attn_interface.py` at the release tags:

  "2.6" (v2.6.0 - v2.6.3)
    _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
        softmax_scale, causal, window_size, softcap, alibi_slopes, return_softmax, ...)
        -> (out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state)           (no defaults in v2.6.0)
    _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        deterministic, rng_state=None) -> (dq, dk, dv, softmax_d)
  "2.7" (v2.7.0 - v2.8.3)
    _flash_attn_varlen_forward(..., causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
        alibi_slopes=None, return_softmax=False, ...) -> (out, softmax_lse, S_dmask, rng_state)
    _flash_attn_varlen_backward(..., causal, window_size_left, window_size_right, softcap, alibi_slopes,
        deterministic, rng_state=None[, zero_tensors=False since 2.7.4]) -> softmax_d
    both also registered as torch custom ops, `_wrapped_flash_attn_varlen_forward/_backward` (torch >= 2.4),
    which we prefer (they compose with torch.compile).

In both, softmax_lse is float32 [Hq, total_q] and the backward writes dq, dk, dv into the buffers it is
given. Before 2.6 the varlen lse was padded [B, H, max_seqlen_q] (csrc/flash_attn/flash_api.cpp,
mha_varlen_fwd, v2.5.9): refused. Versions after 2.8 are unread: refused until someone reads them.
GQA is native (Hq % Hkv == 0). Same contract as `cpu.py`; `contract.py` checks every result.
flash-attn is an optional extra: `pip install 'pg_deepspeed[flash]'`.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
from typing import Callable

import torch
from packaging.version import InvalidVersion, Version

from pg_deepspeed.attention.contract import (DeviceFacts, Kernels, check_backward, check_forward, half_on_cuda,
                                             probe, returned)

NAME = "flash_attn"
SUPPORTED = "2.6.0 to 2.8.x"  # keep in step with setup.cfg's `flash` extra


def calling_convention(version: str) -> str | None:
    """"2.6" or "2.7" (which signatures the installed flash-attn has), None when it is not supported."""
    try:
        release = Version(version).release[:2]
    except InvalidVersion:
        return None
    if (2, 6) <= release < (2, 7):
        return "2.6"
    if (2, 7) <= release < (2, 9):
        return "2.7"
    return None


@functools.lru_cache(maxsize=1)
def installed_version() -> str | None:
    """The installed flash-attn distribution's version, None when it is not installed."""
    try:
        return importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        return None


def decide(version: str | None, facts: DeviceFacts, dtype: torch.dtype) -> str | None:
    """Why this backend cannot run (the pure decision; `available` probes its inputs), or None."""
    if version is None:
        return f"backend {NAME!r} needs the flash-attn package: pip install 'pg_deepspeed[flash]'"
    if calling_convention(version) is None:
        return (f"backend {NAME!r} supports flash-attn {SUPPORTED}, but flash-attn {version} is installed "
                "(before 2.6 the varlen log-sum-exp is padded; later versions are not read yet)")
    return half_on_cuda(NAME, facts, dtype)


def bind(version: str, forward: Callable, backward: Callable) -> Kernels:
    """Kernels for `version`; raises for a version whose calling convention is not declared here."""
    convention = calling_convention(version)
    if convention is None:
        raise RuntimeError(f"backend {NAME!r} supports flash-attn {SUPPORTED}, got {version}")
    return Kernels(f"flash-attn {version}, {convention} calling convention", forward, backward, convention)


_kernels: Kernels | None = None


def kernels() -> Kernels:
    """The installed flash-attn's kernels, imported on first use."""
    global _kernels
    if _kernels is None:
        iface = importlib.import_module("flash_attn.flash_attn_interface")
        fwd = getattr(iface, "_wrapped_flash_attn_varlen_forward", None) or iface._flash_attn_varlen_forward
        bwd = getattr(iface, "_wrapped_flash_attn_varlen_backward", None) or iface._flash_attn_varlen_backward
        _kernels = bind(installed_version(), fwd, bwd)
    return _kernels


@functools.lru_cache(maxsize=None)
def _import_problem() -> str | None:
    try:
        kernels()
    except Exception as error:  # a wheel built for another torch or CUDA fails here, not at install
        return f"backend {NAME!r}: importing flash-attn {installed_version()} failed: {error}"
    return None


def available(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when this backend can run; otherwise why not."""
    return decide(installed_version(), probe(device), dtype) or _import_problem()


def forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    kn = kernels()
    q, k, v = (x.contiguous() for x in (q, k, v))
    if kn.convention == "2.6":
        result = kn.forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, scale, causal, (-1, -1), 0.0, None, False)
        out, _q, _k, _v, _out_padded, lse, _s, _rng = returned(result, 8, NAME, kn.label, "forward")
    else:
        result = kn.forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, scale, causal, -1, -1, 0.0, None, False)
        out, lse, _s, _rng = returned(result, 4, NAME, kn.label, "forward")
    return check_forward(NAME, kn.label, q, out, lse)


def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    kn = kernels()
    dout, q, k, v, out = (x.contiguous() for x in (dout, q, k, v, out))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    window = ((-1, -1),) if kn.convention == "2.6" else (-1, -1)
    kn.backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k,
                0.0, scale, causal, *window, 0.0, None, False, None)
    return check_backward(NAME, kn.label, q, k, v, dq, dk, dv)
