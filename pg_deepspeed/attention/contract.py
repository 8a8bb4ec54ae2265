"""What every backend's kernels must return, checked at each call, with an error that names the culprit.

The Function merges two passes through their log-sum-exp (`merge.py`), so a kernel that returns a
padded lse (`[B, H, max_seqlen]`, flash-attn < 2.6 and PyTorch on ROCm), a half-precision lse or an
output of another shape would give wrong numbers, not an error. The GPU kernels cannot run in this
project's CI, so each backend checks their results on every call (causal pass and cross pass, forward
and backward): metadata only (shape, dtype, device, contiguity), no device synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


class KernelContractError(RuntimeError):
    """A kernel returned something other than what its backend was written for."""


@dataclass(frozen=True)
class Kernels:
    """A backend's forward/backward kernels (or their contract doubles), where they come from (`label`, quoted in
    every contract error) and, where a backend declares several, the calling convention they follow."""

    label: str
    forward: Callable
    backward: Callable
    convention: str = ""


def _problems(name: str, x: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> list[str]:
    if not isinstance(x, Tensor):
        return [f"{name} is {type(x).__name__}, expected a tensor"]
    found = []
    if tuple(x.shape) != shape:
        found.append(f"{name} has shape {tuple(x.shape)}, expected {shape}")
    if x.dtype != dtype:
        found.append(f"{name} has dtype {x.dtype}, expected {dtype}")
    if x.device != device:
        found.append(f"{name} is on {x.device}, expected {device}")
    if not x.is_contiguous():
        found.append(f"{name} is not contiguous (strides {tuple(x.stride())})")
    return found


def _raise(found: list[str], backend: str, version: str, call: str) -> None:
    if found:
        raise KernelContractError(
            f"attention backend {backend!r} ({version}) broke its kernel contract in {call}: "
            + "; ".join(found)
            + ". This kernel version is not supported; pick another backend (backend='cpu' always runs)."
        )


def returned(result: object, count: int, backend: str, version: str, call: str) -> tuple:
    """`result` as a tuple of `count` values (the kernel's declared return), or KernelContractError."""
    if not isinstance(result, (tuple, list)) or len(result) != count:
        got = f"{len(result)} values" if isinstance(result, (tuple, list)) else type(result).__name__
        _raise([f"the kernel returned {got}, expected {count}"], backend, version, call)
    return tuple(result)


def check_forward(backend: str, version: str, q: Tensor, out: object, lse: object) -> tuple[Tensor, Tensor]:
    """(out, lse) as the Function needs them, or KernelContractError.

    q: [Tq, Hq, D]; out must be [Tq, Hq, D] in q's dtype, lse float32 [Hq, Tq], both contiguous on q's device.
    """
    found = _problems("out", out, tuple(q.shape), q.dtype, q.device)
    found += _problems("lse", lse, (q.shape[1], q.shape[0]), torch.float32, q.device)
    _raise(found, backend, version, "forward")
    return out, lse


def check_backward(backend: str, version: str, q: Tensor, k: Tensor, v: Tensor, dq, dk, dv) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) shaped, typed and placed like (q, k, v), or KernelContractError."""
    found = []
    for name, grad, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        found += _problems(name, grad, tuple(like.shape), like.dtype, like.device)
    _raise(found, backend, version, "backward")
    return dq, dk, dv


# ---------------------------------------------------------------- what the device offers
HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class DeviceFacts:
    """The facts a GPU backend decides on, probed once (`probe`) so that the decision is a pure function."""

    type: str  # torch.device.type
    capability: tuple[int, int] | None  # CUDA compute capability; None off CUDA or when torch sees no GPU
    hip: str | None  # torch.version.hip: set on ROCm builds, whose "cuda" device is an AMD GPU


def probe(device: torch.device) -> DeviceFacts:
    """DeviceFacts of `device`; touches the CUDA driver only for a CUDA device torch can see."""
    capability = None
    if device.type == "cuda" and torch.cuda.is_available():
        capability = tuple(torch.cuda.get_device_capability(device))
    return DeviceFacts(device.type, capability, torch.version.hip)


def half_on_cuda(backend: str, facts: DeviceFacts, dtype: torch.dtype, min_capability=(8, 0)) -> str | None:
    """Why a CUDA fp16/bf16 kernel backend cannot run here, or None. Checks cheapest first."""
    if facts.type != "cuda":
        return f"backend {backend!r} needs CUDA tensors, got device {facts.type}"
    if dtype not in HALF:
        return f"backend {backend!r} needs float16 or bfloat16, got {dtype}; use backend='cpu' for {dtype}"
    if facts.capability is None:
        return f"backend {backend!r} needs a CUDA GPU, but torch sees none"
    if facts.capability < tuple(min_capability):
        have, need = ".".join(map(str, facts.capability)), ".".join(map(str, min_capability))
        return f"backend {backend!r} needs compute capability {need} or newer, this GPU has {have}"
    return None
