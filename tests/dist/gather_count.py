"""Counts the all-gathers torch.distributed sees (ZeRO-3 gathers parameters with them). Import before deepspeed,
which binds these functions when it is imported: `import gather_count` then read or reset `gather_count.COUNT[0]`."""
import torch.distributed as dist

COUNT = [0]


def _counting(fn):
    def call(*args, **kwargs):
        COUNT[0] += 1
        return fn(*args, **kwargs)
    return call


for _name in ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_coalesced"):
    if hasattr(dist, _name):
        setattr(dist, _name, _counting(getattr(dist, _name)))
