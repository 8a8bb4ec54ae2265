"""Peak memory of a block of code, above what was resident when it began (one measure for the trainer and benches).

| device | measured                                                                                            |
|--------|-----------------------------------------------------------------------------------------------------|
| CUDA   | `torch.cuda.max_memory_allocated` after a reset, minus the allocation before the block              |
| CPU    | the process's peak resident set (VmHWM, reset through /proc/self/clear_refs), minus VmRSS before it |

On CPU the allocator keeps freed pages resident, so a block that reuses them shows less than it touched: the
measure is honest for the first large pass in a process and a lower bound after it. Linux only on CPU.
"""
from __future__ import annotations

import re

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}; peak RSS needs Linux")
    return int(match.group(1))


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.bytes`: the block's peak memory above its start."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.bytes = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self._before = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._before
        else:
            # the kernel's RSS counters are per-thread caches, exact only to some pages: a block that grew nothing
            # can read a few KB below its start (the two-rank train test saw -54 KB), which is 0
            self.bytes = max(0, _status_kib("VmHWM") * 1024 - self._before)

    @staticmethod
    def method(device: torch.device | str) -> str:
        """One line saying how peak memory is measured on `device`."""
        if torch.device(device).type == "cuda":
            return "torch.cuda.max_memory_allocated during the block, above the allocation before it"
        return "peak RSS (VmHWM, reset via /proc/self/clear_refs) during the block, above the RSS before it"
