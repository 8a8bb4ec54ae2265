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
    tokens_alone: int  # what forwarding each member alone (its prompt, then its completion) would take

    @property
    def prefix_tokens_saved(self) -> int:
        """Tokens this packing does not recompute against each member forwarded alone: every repeat of a prompt, a
        preamble and a shared turn (a member whose completion another's contains, or equals, counts too)."""
        return self.tokens_alone - self.layout.num_tokens

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
                     sizes: Sequence[int], preamble: int = 0, share_completions: bool = False) -> CompletionPacking:
    """Pack a micro-batch; `preamble` > 0 shares the first `preamble` prompt tokens of all prompts (three levels);
    `share_completions` also shares what a group's completions begin with in common (a tree at any depth).

    prompt_*: [B, Lp]; completion_*: [N, Lc], group rows consecutive; sizes: G_g per prompt.
    share_completions: completions of one group that begin with the same tokens (the earlier turns of a multi-turn
        rollout sampled as a tree, or samples that happen to agree) get those tokens once, as a common ancestor
        segment; each completion token is still scored at its own (member, column).
    """
    groups = PrefixGroupLayout.from_masks(prompt_mask, completion_mask, list(sizes))
    ids = groups.pack(prompt_ids, completion_ids)
    alone = int((groups.prefix_lens * groups.group_sizes).sum() + groups.suffix_lens.sum())
    if preamble == 0 and not share_completions:
        return CompletionPacking(groups, ids, groups.suffix_index, groups.suffix_row, groups.suffix_col,
                                 groups.num_members, groups.completion_width, alone)
    return _as_tree(groups, ids, preamble, share_completions, alone)


def completion_trie(lcp: list[list[int]], lengths: list[int]) -> tuple[list[tuple[int, int, int, int]],
                                                                       list[list[int]]]:
    """The trie of one group's completions from their longest common prefixes.

    lcp: [G][G] tokens that completions a and b begin with in common (lcp[a][a] = lengths[a]); lengths: [G].
    Returns the segments as (parent or -1 for the prompt, representative member, first column, end column), every
    parent before its children, and each member's path (segment indices, root first). Common prefixes form an
    ultrametric (lcp(a, c) >= min(lcp(a, b), lcp(b, c))), so what a set of members shares is the least lcp of one of
    them with the others, and two members go down the same child iff they share more than their parent's end.
    """
    segments: list[tuple[int, int, int, int]] = []
    paths: list[list[int]] = [[] for _ in lengths]

    def grow(members: list[int], start: int, parent: int) -> None:
        first = members[0]
        end = min(lcp[first][m] for m in members)
        node = parent
        if end > start:
            segments.append((parent, first, start, end))
            node = len(segments) - 1
            for m in members:
                paths[m].append(node)
        rest = [m for m in members if lengths[m] > end]
        while rest:
            head = rest[0]
            child = [m for m in rest if m == head or lcp[head][m] > end]
            rest = [m for m in rest if m != head and lcp[head][m] <= end]
            grow(child, end, node)

    if lengths:
        grow(list(range(len(lengths))), 0, -1)
    return segments, paths


def common_prefixes(rows: Tensor, lengths: Tensor) -> list[list[int]]:
    """rows: [G, L] token ids, lengths: [G] -> [G][G] longest common prefix of each pair (within both lengths)."""
    cols = torch.arange(rows.shape[1], device=rows.device)
    valid = cols[None, :] < lengths[:, None]
    same = (rows[:, None, :] == rows[None, :, :]) & valid[:, None, :] & valid[None, :, :]
    return same.long().cumprod(-1).sum(-1).tolist()


def _as_tree(groups: PrefixGroupLayout, ids: Tensor, n: int, share_completions: bool,
             tokens_alone: int) -> CompletionPacking:
    """The two-level packing re-cut as a tree: the first n tokens of every prompt once at the root (n > 0), then per
    group the prompt's rest (when it has one), then its completions, each alone or (share_completions) as the trie
    of what they begin with in common. Each completion token keeps its (member, column); a shared one is scored at
    its one packed copy."""
    P, G, S = groups.prefix_lens.tolist(), groups.group_sizes.tolist(), groups.suffix_lens.tolist()
    device = ids.device
    starts = groups.cu_groups.tolist()
    if n:
        if not 1 <= n <= min(P):
            raise ValueError(f"preamble of {n} tokens does not fit the prompts (the shortest has {min(P)} tokens)")
        preamble = ids[starts[0]: starts[0] + n]
        for g in range(1, len(P)):
            if not torch.equal(ids[starts[g]: starts[g] + n], preamble):
                raise ValueError(f"prompt {g} does not begin with the {n}-token preamble of prompt 0")
    arange = lambda a, b: torch.arange(a, b, device=device)
    parents, lengths, keep = ([-1], [n], [arange(0, n)]) if n else ([], [], [])
    # completion tokens that are a copy of another member's (src) and the two-level index of that token (dst)
    copies_src, copies_dst = [], []
    member = 0
    for g in range(len(P)):
        parent = 0 if n else -1
        if P[g] > n:
            parents.append(parent)
            lengths.append(P[g] - n)
            keep.append(arange(starts[g] + n, starts[g] + P[g]))
            parent = len(parents) - 1
        first_suffix = starts[g] + P[g]  # members' suffixes follow the prompt in two-level order
        offsets = [first_suffix + sum(S[member:member + i]) for i in range(G[g])]
        if share_completions and G[g] > 1:
            width = max(S[member:member + G[g]])
            rows = torch.stack([torch.nn.functional.pad(ids[o:o + s], (0, width - s), value=-1)
                                for o, s in zip(offsets, S[member:member + G[g]])])
            lens = torch.tensor(S[member:member + G[g]], device=device)
            segments, paths = completion_trie(common_prefixes(rows, lens), S[member:member + G[g]])
        else:
            segments = [(-1, i, 0, S[member + i]) for i in range(G[g])]
            paths = [[i] for i in range(G[g])]
        base = len(parents)
        for seg_parent, rep, a, b in segments:
            parents.append(parent if seg_parent < 0 else base + seg_parent)
            lengths.append(b - a)
            keep.append(arange(offsets[rep] + a, offsets[rep] + b))
        for i, path in enumerate(paths):
            for s in path:
                _, rep, a, b = segments[s]
                if rep != i:
                    copies_src.append(arange(offsets[i] + a, offsets[i] + b))
                    copies_dst.append(arange(offsets[rep] + a, offsets[rep] + b))
        member += G[g]
    order = torch.cat(keep)
    layout = PrefixTreeLayout.from_parents(parents, lengths, device)
    new_index = torch.full((groups.num_tokens,), -1, dtype=torch.long, device=device)
    new_index[order] = torch.arange(order.numel(), device=device)
    if copies_src:
        new_index[torch.cat(copies_src)] = new_index[torch.cat(copies_dst)]
    return CompletionPacking(layout, ids[order], new_index[groups.suffix_index], groups.suffix_row, groups.suffix_col,
                             groups.num_members, groups.completion_width, tokens_alone)
