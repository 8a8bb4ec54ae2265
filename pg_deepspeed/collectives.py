"""Small collectives over all ranks; each is the identity when torch.distributed is not initialised."""
from __future__ import annotations

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """The device that the process group's backend reduces on: the current GPU for NCCL, else CPU."""
    if _distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on any rank (all-reduce MAX). Collective: every rank must call it."""
    if not _distributed():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32, device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def max_over_ranks(value: int) -> int:
    """The largest `value` of any rank (all-reduce MAX). Collective: every rank must call it."""
    if not _distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_mean(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each named value (one all-reduce). Collective: every rank passes the same names."""
    if not _distributed():
        return dict(values)
    names = sorted(values)
    t = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return dict(zip(names, (t / dist.get_world_size()).tolist()))


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on every rank (same n) -> [world * n, ...], rank order."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def broadcast_from_first(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """The first rank of `group`'s tensors, on every rank of it (any shapes: they travel as objects)."""
    objects = [[t.cpu() for t in tensors]]
    dist.broadcast_object_list(objects, src=dist.get_global_rank(group, 0), group=group)
    return [t.to(x.device) for t, x in zip(objects[0], tensors)]


def shutdown() -> None:
    """Wait for every rank, then destroy all process groups. Collective: every rank calls it once, at the end.

    A process that exits with its process group alive can abort at interpreter teardown, after all its work
    succeeded: gloo's worker threads are still joinable ("terminate called without an active exception", exit -6).
    Two two-rank trainer runs of one CI run here (torch 2.13, gloo) ended so; torch has no exit hook that does this.
    """
    if _distributed():
        dist.barrier()
        dist.destroy_process_group()
