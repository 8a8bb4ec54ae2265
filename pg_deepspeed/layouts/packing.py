"""A GRPO micro-batch packed for one forward: prompts once, completions after them, and where each
completion token and its predictor sit in the packed row.

Two shapes of sharing:
- two levels (`PrefixGroupLayout`): each prompt once, its G completions after it;
- three levels (`PrefixTreeLayout`): a preamble that every prompt of the micro-batch begins with (a system
  prompt, tool specification, few-shot examples) once, then each prompt's own rest, then its completions.

Shapes: B prompts, N completions, Lp / Lc padded widths, T packed tokens, Ts completion tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from pg_deepspeed.layouts.group import PrefixGroupLayout
from pg_deepspeed.layouts.tree import PrefixTreeLayout


@dataclass(frozen=True)
class CompletionPacking:
    """| field      | shape | meaning                                                          |
    |------------|-------|------------------------------------------------------------------|
    | layout     |       | what attention sees (its `predecessor` predicts each token)      |
    | ids        | [T]   | packed token ids                                                 |
    | targets    | [Ts]  | packed index of each completion token                            |
    | rows, cols | [Ts]  | (completion, column) of each completion token in the [N, Lc] batch |
    """

    layout: PrefixGroupLayout | PrefixTreeLayout
    ids: Tensor
    targets: Tensor
    rows: Tensor
    cols: Tensor
    num_completions: int
    width: int

    def unpack(self, x: Tensor) -> Tensor:
        """x: [Ts] in `targets` order -> [N, Lc], 0 at padded places (differentiable)."""
        out = x.new_zeros(self.num_completions, self.width)
        return out.index_put((self.rows, self.cols), x)


def common_prefix_length(prompt_ids: Tensor, prompt_mask: Tensor) -> int:
    """Tokens that every prompt's valid part begins with. prompt_ids, prompt_mask: [B, Lp], left- or right-padded."""
    mask = prompt_mask.bool()
    lengths = mask.sum(1)
    shortest = int(lengths.min())
    if shortest == 0:
        return 0
    cols = torch.arange(mask.shape[1], device=mask.device)
    start = torch.where(mask, cols, mask.shape[1]).amin(1)
    aligned = prompt_ids.gather(1, start[:, None] + cols[None, :shortest])
    return int((aligned == aligned[:1]).all(0).long().cumprod(0).sum())


def pack_completions(prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor,
                     sizes: Sequence[int], preamble: int = 0) -> CompletionPacking:
    """Pack a micro-batch; `preamble` > 0 shares the first `preamble` prompt tokens of all prompts (three levels).

    prompt_*: [B, Lp]; completion_*: [N, Lc], group rows consecutive; sizes: G_g per prompt.
    """
    groups = PrefixGroupLayout.from_masks(prompt_mask, completion_mask, list(sizes))
    ids = groups.pack(prompt_ids, completion_ids)
    if preamble == 0:
        return CompletionPacking(groups, ids, groups.suffix_index, groups.suffix_row, groups.suffix_col,
                                 groups.num_members, groups.completion_width)
    return _with_preamble(groups, ids, preamble)


def _with_preamble(groups: PrefixGroupLayout, ids: Tensor, n: int) -> CompletionPacking:
    """The two-level packing re-cut as a tree: the first n tokens of every prompt once at the root, then per group
    the prompt's rest (when it has one) and its completions, in the two-level order."""
    P, G, S = groups.prefix_lens.tolist(), groups.group_sizes.tolist(), groups.suffix_lens.tolist()
    if not 1 <= n <= min(P):
        raise ValueError(f"preamble of {n} tokens does not fit the prompts (the shortest has {min(P)} tokens)")
    starts = groups.cu_groups.tolist()
    preamble = ids[starts[0]: starts[0] + n]
    for g in range(1, len(P)):
        if not torch.equal(ids[starts[g]: starts[g] + n], preamble):
            raise ValueError(f"prompt {g} does not begin with the {n}-token preamble of prompt 0")
    parents, lengths, keep = [-1], [n], [torch.arange(n, device=ids.device)]
    member = 0
    for g in range(len(P)):
        parent = 0
        if P[g] > n:
            parents.append(0)
            lengths.append(P[g] - n)
            parent = len(parents) - 1
        keep.append(torch.arange(starts[g] + n, starts[g + 1], device=ids.device))
        for _ in range(G[g]):
            parents.append(parent)
            lengths.append(S[member])
            member += 1
    order = torch.cat(keep)
    layout = PrefixTreeLayout.from_parents(parents, lengths, ids.device)
    new_index = torch.full((groups.num_tokens,), -1, dtype=torch.long, device=ids.device)
    new_index[order] = torch.arange(order.numel(), device=ids.device)
    return CompletionPacking(layout, ids[order], new_index[groups.suffix_index], groups.suffix_row, groups.suffix_col,
                             groups.num_members, groups.completion_width)
