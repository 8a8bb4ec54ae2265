"""How a run's ranks divide: `dp` data-parallel replicas of `sp` sequence-parallel ranks each (world = dp × sp)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pg_deepspeed.models.sequence_shards import check_head_split


def ranks_per_node(default: int) -> int:
    """The ranks on this rank's node, as its launcher says: the DeepSpeed launcher's LOCAL_SIZE, else torchrun's
    LOCAL_WORLD_SIZE (`default` when neither is set). LOCAL_SIZE first: vLLM's CPU platform overwrites
    LOCAL_WORLD_SIZE with its tensor parallel size in the process that builds an engine, and processes it starts
    inherit that (vllm 0.32 `platforms/cpu.py`)."""
    return int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or default)


@dataclass(frozen=True)
class ParallelDims:
    """`world` ranks in groups of `sp` consecutive ranks; each group shares one packed micro-batch along the sequence
    (DeepSpeed Ulysses) and is one data-parallel replica. ZeRO-3 shards and reduces over all `world` ranks."""

    world: int
    sp: int = 1

    def __post_init__(self) -> None:
        for name, value in (("world size", self.world), ("sequence_parallel_size", self.sp)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.world % self.sp:
            raise ValueError(f"sequence_parallel_size={self.sp} does not divide the {self.world} ranks")

    @property
    def dp(self) -> int:
        """Data-parallel replicas: what the batch size counts."""
        return self.world // self.sp

    def replica(self, rank: int) -> int:
        """The data-parallel replica (sequence-parallel group) of global `rank`."""
        return rank // self.sp

    def check_model(self, config: Any) -> None:
        """Refuse an `sp` that does not split the model's attention heads (Ulysses all-to-alls heads)."""
        check_head_split(config, self.sp, name="sequence_parallel_size=")
