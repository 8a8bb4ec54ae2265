"""Advantage estimators over groups of consecutive rows (variable group sizes allowed).

r: [N] rewards, group_sizes: [B] with sum = N. For member i of group g (mean m_g, std s_g, size G):
  grpo     A_i = (r_i - m_g) / (s_g + eps)     (s_g: unbiased std, as TRL)
  dr_grpo  A_i = r_i - m_g                     (Dr. GRPO: no std normalisation)
  rloo     A_i = r_i - mean_{j≠i} r_j = G/(G-1) · (r_i - m_g)
"""
from __future__ import annotations

import torch
from torch import Tensor

ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def group_advantages(rewards: Tensor, group_sizes: Tensor, estimator: str = "grpo", eps: float = 1e-4) -> Tensor:
    """rewards: [N], group_sizes: [B] -> advantages [N] float32."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {ESTIMATORS}")
    if int(group_sizes.sum()) != rewards.numel():
        raise ValueError(f"group sizes add up to {int(group_sizes.sum())} but there are {rewards.numel()} rewards")
    r = rewards.double()
    B = group_sizes.numel()
    group = torch.repeat_interleave(torch.arange(B, device=r.device), group_sizes)
    size = group_sizes.to(r)[group]
    group_sum = lambda x: torch.zeros(B, dtype=x.dtype, device=x.device).index_add_(0, group, x)[group]
    mean = group_sum(r) / size
    centred = r - mean
    if estimator == "dr_grpo":
        return centred.float()
    if estimator == "rloo":
        if bool((group_sizes < 2).any()):
            raise ValueError("rloo needs at least 2 completions per prompt")
        return (centred * size / (size - 1)).float()
    var = group_sum(centred**2) / (size - 1).clamp(min=1)
    return (centred / (var.sqrt() + eps)).float()
