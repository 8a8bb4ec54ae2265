"""The policy's learning-rate schedule: linear warm-up, then cosine decay, counted in optimizer steps.

A config's ``"scheduler": {"type": "WarmupCosineLR"}`` with ``"warmup_type": "linear"`` (the shipped configs) is
built here, not by DeepSpeed. DeepSpeed's own class (0.19.8, ``runtime/lr_schedules.py``) sets the learning rate to
``warmup_min_ratio`` (0 in the shipped configs) at construction and again after the first step
(``last_batch_iteration / warmup_num_steps`` with ``last_batch_iteration`` 0), and raises ``warmup_num_steps`` to at
least 2: the first **two** optimizer steps of every run trained at lr 0, whatever ``--warmup_steps`` said (0 and 1
included), and the peak was never used. Here optimizer step ``u`` (1, 2, ...) uses, with W warm-up steps and T in all:

- ``u <= W``: ``warmup_min_ratio + (1 - warmup_min_ratio) * u / W`` of the peak (step W at the peak);
- ``u > W``: ``cos_min_ratio + (1 - cos_min_ratio) * (1 + cos(pi * min(1, (u - W) / (T - W)))) / 2`` (step T at
  ``cos_min_ratio``).

It is a ``torch.optim.lr_scheduler.LambdaLR``: DeepSpeed steps it after each applied optimizer step (a skipped
non-finite step does not move it) and saves and restores its state in checkpoints.
"""
from __future__ import annotations

import math

import torch

# DeepSpeed's WarmupCosineLR defaults for the keys a config may leave out
_DEFAULTS = {"warmup_min_ratio": 0.0, "warmup_num_steps": 1000, "cos_min_ratio": 0.0001, "warmup_type": "log"}


def warmup_cosine_ratio(update: int, warmup: int, total: int, warmup_min_ratio: float = 0.0,
                        cos_min_ratio: float = 0.0001) -> float:
    """The share of the peak learning rate that optimizer step `update` (1-based) uses (see the module doc)."""
    if update <= warmup:
        return warmup_min_ratio + (1.0 - warmup_min_ratio) * update / warmup
    progress = min(1.0, (update - warmup) / max(1, total - warmup))
    return cos_min_ratio + (1.0 - cos_min_ratio) * (1.0 + math.cos(math.pi * progress)) / 2.0


def builds_schedule(ds_config: dict) -> bool:
    """Whether the config's scheduler is one this module builds (WarmupCosineLR with a linear warm-up)."""
    scheduler = ds_config.get("scheduler") or {}
    params = {**_DEFAULTS, **scheduler.get("params", {})}
    return scheduler.get("type") == "WarmupCosineLR" and params["warmup_type"] == "linear"


def split_scheduler(ds_config: dict):
    """(the config to hand DeepSpeed, the client scheduler for ``deepspeed.initialize(lr_scheduler=...)`` or None).

    A linear WarmupCosineLR is taken out of the config and returned as a callable DeepSpeed calls with its optimizer;
    any other scheduler stays in the config for DeepSpeed to build."""
    if not builds_schedule(ds_config):
        return ds_config, None
    config = dict(ds_config)
    params = {**_DEFAULTS, **config.pop("scheduler").get("params", {})}
    unknown = set(params) - {*_DEFAULTS, "total_num_steps", "last_batch_iteration"}
    if unknown:
        raise ValueError(f"scheduler WarmupCosineLR: unknown params {sorted(unknown)}")
    if params.get("last_batch_iteration", -1) != -1:
        raise ValueError("scheduler WarmupCosineLR: last_batch_iteration must be -1 (a resumed run restores the "
                         "schedule from its checkpoint)")
    warmup, total = params["warmup_num_steps"], params.get("total_num_steps")
    for name, value in (("warmup_num_steps", warmup), ("total_num_steps", total)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"scheduler WarmupCosineLR: {name} must be a non-negative int, got {value!r}")

    def build(optimizer: torch.optim.Optimizer) -> WarmupCosine:
        return WarmupCosine(optimizer, warmup, total, params["warmup_min_ratio"], params["cos_min_ratio"])

    return config, build


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """:func:`warmup_cosine_ratio` of each param group's initial rate. LambdaLR's step count s starts at 0 and sets
    the rate of optimizer step s + 1."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int, total: int, warmup_min_ratio: float = 0.0,
                 cos_min_ratio: float = 0.0001) -> None:
        super().__init__(optimizer, lambda s: warmup_cosine_ratio(s + 1, warmup, total, warmup_min_ratio,
                                                                  cos_min_ratio))

    def load_state_dict(self, state_dict: dict) -> None:
        """Its own state, or the state DeepSpeed's WarmupCosineLR saved (`{"last_batch_iteration": k - 1}` after k
        steps: a checkpoint written before this class), resumed at the same step count. The first step after such a
        resume runs at the rate the old schedule left in the optimizer's state; the next ones follow this schedule."""
        if "lr_lambdas" not in state_dict and set(state_dict) == {"last_batch_iteration"}:
            self.last_epoch = state_dict["last_batch_iteration"] + 1
            return
        super().load_state_dict(state_dict)
