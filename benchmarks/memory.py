"""Peak memory of one call, above what was resident before it (through
`pg_deepspeed.distributed.peak_memory.PeakMemory`).

CUDA: `torch.cuda.max_memory_allocated` after a reset, minus the allocation before the call.
CPU:  the process's peak resident set (VmHWM) after resetting it through /proc/self/clear_refs,
      minus the resident set before the call. Freed pages that the allocator keeps would hide
      later peaks, so on CPU call this once, in a fresh process, before any other pass.
"""
from __future__ import annotations

from typing import Callable

import torch

from pg_deepspeed.distributed.peak_memory import PeakMemory

MiB = 2**20


def cpu_peak_mib(fn: Callable[[], object]) -> float:
    """Peak RSS growth (MiB) while `fn()` runs; Linux only."""
    with PeakMemory("cpu") as peak:
        fn()
    return peak.bytes / MiB


def cuda_peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak allocated CUDA memory (MiB) while `fn()` runs, above the allocation before it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    with PeakMemory(device) as peak:
        fn()
    return peak.bytes / MiB


def method(device: torch.device) -> str:
    """One line saying how peak memory is measured on `device`."""
    if device.type == "cuda":
        return PeakMemory.method(device)
    return ("peak RSS (VmHWM, reset via /proc/self/clear_refs) during the first pass in a fresh "
            "subprocess per variant, above the RSS before it")
