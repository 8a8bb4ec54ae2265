"""Advantage estimators over groups of consecutive rows (variable group sizes allowed).

r: [N] rewards, group_sizes: [B] with sum = N. For member i of group g (mean m_g, std s_g, size G):
  grpo     A_i = (r_i - m_g) / (s_g + eps)     (s_g: unbiased std, as TRL)
  dr_grpo  A_i = r_i - m_g                     (Dr. GRPO: no std normalisation)
  rloo     A_i = r_i - mean_{j≠i} r_j = G/(G-1) · (r_i - m_g)
`node_advantages` gives each token its own, from the tree of what a group's completions share (--advantage_level).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from pg_deepspeed.layouts.packing import common_prefixes, completion_trie

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


def node_advantages(rewards: Tensor, completion_ids: Tensor, completion_mask: Tensor, group_sizes: Tensor) -> Tensor:
    """Per-token advantages from the tree of what each group's completions begin with in common -> [N, Lc] float32.

    rewards: [N]; completion_ids, completion_mask: [N, Lc] right-padded, group rows consecutive; group_sizes: [B].
    A node n of the tree (a run of tokens some completions share: a turn of a sampling tree) has the value
    V(n) = the mean reward of the completions through it, V(root) = the group's mean. Every token of n gets
      A(n) = [(V(n) - V(root)) + (V(n) - V(parent(n)))] / sqrt(|L(n)|),   |L(n)| = completions through n,
    the global and local advantages of TreeRL's process supervision (Hou et al. 2025, arXiv:2506.11902, section 3.2,
    as we read it): a turn is credited for how its continuations did against the group and against its siblings',
    and shared turns, which many leaves update, are damped. A flat group (no shared tokens) gets 2·(r_i - mean).
    """
    if int(group_sizes.sum()) != rewards.numel() or completion_ids.shape[0] != rewards.numel():
        raise ValueError(f"{rewards.numel()} rewards, {completion_ids.shape[0]} completions and group sizes adding up "
                         f"to {int(group_sizes.sum())} must agree")
    r = rewards.double().tolist()
    lengths = completion_mask.sum(1)
    out = torch.zeros(completion_ids.shape, dtype=torch.float64)
    first = 0
    for size in group_sizes.tolist():
        members = range(first, first + size)
        lens = lengths[first:first + size]
        segments, paths = completion_trie(common_prefixes(completion_ids[first:first + size], lens), lens.tolist())
        through: list[list[int]] = [[] for _ in segments]
        for i, path in enumerate(paths):
            for s in path:
                through[s].append(first + i)
        root = sum(r[m] for m in members) / size
        value = [sum(r[m] for m in below) / len(below) for below in through]
        for s, (parent, _, a, b) in enumerate(segments):
            advantage = (2 * value[s] - root - (root if parent < 0 else value[parent])) / math.sqrt(len(through[s]))
            out[through[s], a:b] = advantage
        first += size
    return out.float().to(rewards.device)
