"""Peak memory of one call, above what was resident before it.

CUDA: `torch.cuda.max_memory_allocated` after a reset, minus the allocation before the call.
CPU:  the process's peak resident set (VmHWM) after resetting it through /proc/self/clear_refs,
      minus the resident set before the call. Freed pages that the allocator keeps would hide
      later peaks, so on CPU call this once, in a fresh process, before any other pass.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

MiB = 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}; peak RSS needs Linux")
    return int(match.group(1))


def cpu_peak_mib(fn: Callable[[], object]) -> float:
    """Peak RSS growth (MiB) while `fn()` runs; Linux only."""
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    fn()
    return (_status_kib("VmHWM") - before) * 1024 / MiB


def cuda_peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak allocated CUDA memory (MiB) while `fn()` runs, above the allocation before it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / MiB


def method(device: torch.device) -> str:
    """One line saying how peak memory is measured on `device`."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during the pass, above the allocation before it"
    return ("peak RSS (VmHWM, reset via /proc/self/clear_refs) during the first pass in a fresh "
            "subprocess per variant, above the RSS before it")
