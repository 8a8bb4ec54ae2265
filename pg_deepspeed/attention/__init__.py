"""Prefix-grouped attention: `prefix_grouper_attention` and its backends.

Backends (one module each, one contract, see `cpu.py`; `contract.py` checks what the GPU kernels return):
  "flash_attn_3"  FlashAttention-3's varlen kernels (CUDA sm80+, fp16/bf16; built from flash-attn's hopper/)
  "flash_attn"    the flash-attn package's varlen kernels, 2.6.0 to 2.8.x (CUDA sm80+, fp16/bf16)
  "torch"         PyTorch's own CUDA flash varlen kernels (CUDA sm80+, fp16/bf16, not ROCm)
  "cpu"           per-sequence fused CPU kernel; a matmul path on other devices; any dtype
  "auto"          the first of those that can run on the inputs
"""
from __future__ import annotations

import math
import warnings
from types import ModuleType

import torch
from torch import Tensor

from pg_deepspeed.layouts.attention_plan import AttentionPlan
from pg_deepspeed.attention.backends import cpu, flash, flash3, torch_cuda
from pg_deepspeed.attention.function import PrefixGroupedAttention

BACKENDS: dict[str, ModuleType] = {"flash_attn_3": flash3, "flash_attn": flash, "torch": torch_cuda, "cpu": cpu}
_warned_slow: set[tuple[str, torch.dtype]] = set()


def check_backend_name(name: str) -> None:
    """Raise ValueError naming the choices unless `name` is "auto" or a backend."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {['auto', *BACKENDS]}")


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """The backend module for `name` ("auto" picks the fastest that can run); raises if it cannot run.

    When "auto" lands on "cpu" for a CUDA device (float32, or no usable GPU kernel) it warns once per
    dtype: that path loops over sequences in Python with matmul attention, far slower than a fused kernel.
    """
    if name == "auto":
        reasons = []  # why each backend before the chosen one cannot run
        for chosen, module in BACKENDS.items():
            reason = module.available(device, dtype)
            if reason is None:
                break
            reasons.append(reason)
        if chosen == "cpu" and device.type != "cpu" and (device.type, dtype) not in _warned_slow:
            _warned_slow.add((device.type, dtype))
            why = "; ".join(reasons)
            warnings.warn(
                f"attention backend 'auto' on {device.type} with {dtype} falls back to backend 'cpu', a Python "
                f"loop of one matmul attention per sequence, much slower than a fused kernel ({why}). Load the "
                "model in bfloat16 or float16 to use a fused GPU kernel, or pass backend='cpu' to choose this "
                "path explicitly.",
                RuntimeWarning, stacklevel=2,
            )
        return BACKENDS[chosen]
    check_backend_name(name)
    reason = BACKENDS[name].available(device, dtype)
    if reason is not None:
        raise RuntimeError(reason)
    return BACKENDS[name]


def attention_plan_of(layout) -> AttentionPlan:
    """The attention plan itself, or a layout's (`PrefixGroupLayout`, `PrefixTreeLayout`: their `.plan`)."""
    plan = layout if isinstance(layout, AttentionPlan) else getattr(layout, "plan", None)
    if not isinstance(plan, AttentionPlan):
        raise TypeError(f"layout must be a PrefixGroupLayout, PrefixTreeLayout or AttentionPlan, got "
                        f"{type(layout).__name__}")
    return plan


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, layout: AttentionPlan) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 3:
            raise ValueError(f"{name} must be [T, H, D], got shape {tuple(x.shape)}")
        if x.shape[0] != layout.num_tokens:
            raise ValueError(f"{name} has {x.shape[0]} tokens but the layout packs {layout.num_tokens}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device or layout.device != q.device:
        raise ValueError(
            f"devices differ: q {q.device}, k {k.device}, v {v.device}, layout {layout.device}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head dims differ: q has {q.shape[2]}, k has {k.shape[2]}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")


def prefix_grouper_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout,
    *,
    softmax_scale: float | None = None,
    backend: str = "auto",
    sinks: Tensor | None = None,
) -> Tensor:
    """Attention over a prefix-grouped packed batch.

    q: [T, Hq, D]; k, v: [T, Hkv, D] with Hq % Hkv == 0; returns [T, Hq, D].
    A prefix token attends causally within its prefix; a suffix token attends to its group's
    whole prefix and causally to its own suffix. `layout` is a `PrefixGroupLayout`, a `PrefixTreeLayout` or
    their `AttentionPlan` (`layout.plan`): the attention needs only the plan. Outputs and gradients equal plain causal
    attention over `[prefix_g ; suffix_gi]` for every member. With a `PrefixTreeLayout` a token attends
    causally within its segment and fully to every ancestor segment, for any depth.
    sinks: optional [Hq] attention-sink logits (gpt-oss's `s_aux`): one more logit per head in every row's
    softmax denominator, with no value; differentiable.
    """
    plan = attention_plan_of(layout)
    _check_inputs(q, k, v, plan)
    if sinks is not None and (sinks.shape != (q.shape[1],) or sinks.device != q.device or not sinks.is_floating_point()):
        raise ValueError(
            f"sinks must be a floating [Hq] = [{q.shape[1]}] tensor on {q.device}, got {tuple(sinks.shape)} "
            f"{sinks.dtype} on {sinks.device}"
        )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    module = resolve_backend(backend, q.device, q.dtype)
    return PrefixGroupedAttention.apply(q, k, v, plan, module, scale, sinks)
