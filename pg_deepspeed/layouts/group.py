"""The packed layout of a prefix-grouped micro-batch.

A micro-batch holds B groups. Group g has one prefix (the prompt, P_g tokens) and
G_g suffixes (the sampled completions, S_gi tokens each). Tokens are packed group by
group as ``[prefix_g | suffix_g1 | ... | suffix_gG]``, so the prompt is stored once.

Shapes used below: B groups, N = sum(G_g) members, T packed tokens,
Tp = sum(P_g) prefix tokens, Ts = sum(S_gi) suffix tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

from pg_deepspeed.layouts.attention_plan import AttentionPlan, build_plan, path_predecessors
from pg_deepspeed.layouts.tree import prefix_tokens_saved

GroupSize = Union[int, Sequence[int]]


def group_sizes(group_size: GroupSize, num_groups: int, num_members: int, *,
                groups: str = "prompts", members: str = "completions") -> list[int]:
    """G_g for each of `num_groups` groups from an int (every group) or a list; raises naming what is wrong.

    groups / members: how the caller names its rows in the errors ("prompt_mask rows", say)."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, Sequence)):
        raise TypeError(f"group_size must be an int or a list of ints, got {type(group_size)}")
    sizes = [group_size] * num_groups if isinstance(group_size, int) else list(group_size)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
        raise ValueError(f"group_size must be >= 1 for every group (positive ints), got {group_size}")
    if len(sizes) != num_groups:
        raise ValueError(f"group_size lists {len(sizes)} groups but there are {num_groups} {groups}")
    if sum(sizes) != num_members:
        raise ValueError(f"group sizes add up to {sum(sizes)} but there are {num_members} {members}")
    return sizes


@dataclass(frozen=True, eq=False)
class PrefixGroupLayout:
    """Index tensors for one packed micro-batch; build it with `from_lengths` or `from_masks`.

    | field            | shape   | meaning                                                        |
    |------------------|---------|----------------------------------------------------------------|
    | prefix_lens      | [B]     | P_g                                                            |
    | suffix_lens      | [N]     | S_n, members in group order                                    |
    | group_sizes      | [B]     | G_g                                                            |
    | position_ids     | [T]     | 0..P_g-1 on a prefix, P_g..P_g+S_n-1 on a suffix               |
    | suffix_index     | [Ts]    | packed positions of suffix tokens                              |
    | cu_seqlens       | [B+N+1] | int32 offsets of the causal segments (each prefix, each suffix)|
    | cu_groups        | [B+1]   | int32 offsets of each whole group in the packed order          |
    | suffix_row/col   | [Ts]    | (member, column) of each suffix token in the [N, Lc] batch     |
    | prompt_start     | [B]     | first valid column of each prompt row in the [B, Lp] batch     |
    | predecessor      | [T]     | packed index of the token before each one on its sequence (-1 first) |
    | plan             |         | the attention passes (attention_plan.py): a forest of depth 1  |
    """

    prefix_lens: Tensor
    suffix_lens: Tensor
    group_sizes: Tensor
    position_ids: Tensor
    suffix_index: Tensor
    cu_seqlens: Tensor
    cu_groups: Tensor
    suffix_row: Tensor
    suffix_col: Tensor
    prompt_start: Tensor
    completion_width: int
    num_tokens: int
    predecessor: Tensor
    plan: AttentionPlan

    @property
    def num_groups(self) -> int:
        return self.prefix_lens.numel()

    @property
    def num_members(self) -> int:
        return self.suffix_lens.numel()

    @property
    def device(self) -> torch.device:
        return self.position_ids.device

    @property
    def longest_path(self) -> int:
        """The longest prompt + completion: the longest sequence any token's attention spans."""
        return int((self.prefix_lens.repeat_interleave(self.group_sizes) + self.suffix_lens).max())

    def segments(self) -> tuple[list[int], list[int]]:
        """(parents, lengths) of the packed segments, in packed order: each group's prefix (a root), then its G
        suffixes (children of it). The forest that `PrefixTreeLayout.from_parents` would build the same attention
        from."""
        return _group_parents(self.group_sizes.tolist()), self.cu_seqlens.diff().tolist()

    @property
    def prefix_tokens_saved(self) -> int:
        """Prefix tokens the standard forward would recompute: sum_g (G_g - 1) * P_g (`tree.prefix_tokens_saved`)."""
        return prefix_tokens_saved(*self.segments())

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_lengths(
        cls,
        prefix_lens: Sequence[int],
        suffix_lens: Sequence[Sequence[int]],
        device: torch.device | str | None = None,
        *,
        prompt_start: Sequence[int] | None = None,
        completion_width: int | None = None,
    ) -> "PrefixGroupLayout":
        """Layout from plain lengths: `prefix_lens[g]` = P_g, `suffix_lens[g]` = [S_g1, ..., S_gG].

        `prompt_start[g]` is where group g's prompt starts in its padded row (default 0, i.e.
        right-padded); `completion_width` is the padded completion width Lc (default max S).
        """
        prefix = [int(p) for p in prefix_lens]
        if len(suffix_lens) != len(prefix):
            raise ValueError(
                f"prefix_lens has {len(prefix)} groups but suffix_lens has {len(suffix_lens)}"
            )
        for g, p in enumerate(prefix):
            if p < 1:
                raise ValueError(f"group {g}: empty prefix (length {p}); every group needs >= 1 prompt token")
        for g, members in enumerate(suffix_lens):
            if len(members) < 1:
                raise ValueError(f"group {g}: no suffixes; every group needs >= 1 member")
            for i, s in enumerate(members):
                if int(s) < 1:
                    raise ValueError(f"group {g}, member {i}: empty suffix (length {s}); completions need >= 1 token")
        sizes = [len(m) for m in suffix_lens]
        flat = [int(s) for m in suffix_lens for s in m]
        width = max(flat) if completion_width is None else int(completion_width)
        if width < max(flat):
            raise ValueError(f"completion_width {width} is shorter than the longest suffix ({max(flat)})")
        start = [0] * len(prefix) if prompt_start is None else [int(s) for s in prompt_start]
        if len(start) != len(prefix):
            raise ValueError(f"prompt_start has {len(start)} entries for {len(prefix)} groups")
        return cls._build(prefix, sizes, flat, start, width, torch.device(device or "cpu"))

    @classmethod
    def from_masks(cls, prompt_mask: Tensor, completion_mask: Tensor, group_size: GroupSize) -> "PrefixGroupLayout":
        """Layout from a trainer's masks.

        prompt_mask: [B, Lp], left- or right-padded, one row per group.
        completion_mask: [N, Lc], right-padded, the rows of one group consecutive.
        group_size: G for every group, or a list of B sizes.

        A completion row whose mask is all zero spans the whole width Lc: its tokens exist but the
        loss ignores them (TRL's `mask_truncated_completions` zeroes the mask of completions cut at
        the length limit, which fill the width). The layout says what attention sees; the mask stays
        the caller's loss mask.
        """
        if prompt_mask.dim() != 2:
            raise ValueError(f"prompt_mask must be [B, Lp], got shape {tuple(prompt_mask.shape)}")
        if completion_mask.dim() != 2:
            raise ValueError(f"completion_mask must be [N, Lc], got shape {tuple(completion_mask.shape)}")
        if prompt_mask.device != completion_mask.device:
            raise ValueError(
                f"prompt_mask is on {prompt_mask.device} but completion_mask is on {completion_mask.device}"
            )
        sizes = group_sizes(group_size, prompt_mask.shape[0], completion_mask.shape[0], groups="prompt_mask rows",
                            members="completion_mask rows")

        pm, cm = prompt_mask.bool(), completion_mask.bool()
        p_lens = pm.sum(1)
        cols = torch.arange(pm.shape[1], device=pm.device)
        first = torch.where(pm, cols, pm.shape[1]).amin(1)
        last = torch.where(pm, cols, -1).amax(1)
        c_lens = cm.sum(1)
        c_cols = torch.arange(cm.shape[1], device=cm.device)
        c_holes = (cm != (c_cols < c_lens[:, None])).any(1)
        p_holes = (p_lens > 0) & (last - first + 1 != p_lens)
        # one host sync for every check and length
        stats = torch.stack([p_lens, first, p_holes.long()], 1).tolist()
        c_stats = torch.stack([c_lens, c_holes.long()], 1).tolist()
        for g, (p, _, holes) in enumerate(stats):
            if p == 0:
                raise ValueError(f"prompt_mask row {g} (group {g}) is empty; every group needs >= 1 prompt token")
            if holes:
                raise ValueError(f"prompt_mask row {g} (group {g}) has holes: valid tokens must be contiguous")
        for n, (s, holes) in enumerate(c_stats):
            if holes:
                raise ValueError(
                    f"completion_mask row {n} has holes or is not right-padded: valid tokens must come first"
                )
        width = cm.shape[1]
        if width == 0:
            raise ValueError("completion_mask has no columns; completions need >= 1 token")
        suffix = [s or width for s, _ in c_stats]  # an all-zero row: the whole width, ignored by the loss
        return cls._build([s[0] for s in stats], sizes, suffix, [s[1] for s in stats], width, pm.device)

    @classmethod
    def _build(
        cls,
        prefix: list[int],
        sizes: list[int],
        suffix: list[int],
        start: list[int],
        width: int,
        device: torch.device,
    ) -> "PrefixGroupLayout":
        B, N = len(prefix), len(suffix)
        i64 = dict(dtype=torch.long, device=device)
        P = torch.tensor(prefix, **i64)
        S = torch.tensor(suffix, **i64)
        G = torch.tensor(sizes, **i64)
        member_group = torch.repeat_interleave(torch.arange(B, **i64), G)

        # Segments in packed order: group g's prefix sits at slot g + (members before g).
        members_before = torch.cumsum(G, 0) - G
        prefix_slot = torch.arange(B, **i64) + members_before
        member_slot = torch.arange(N, **i64) + member_group + 1
        seg_len = torch.empty(B + N, **i64)
        seg_len[prefix_slot] = P
        seg_len[member_slot] = S
        seg_is_prefix = torch.zeros(B + N, dtype=torch.bool, device=device)
        seg_is_prefix[prefix_slot] = True
        seg_offset = torch.cat([P.new_zeros(1), torch.cumsum(seg_len, 0)])
        # each segment's position offset: 0 on a prefix, P_g on a suffix
        seg_pos0 = torch.zeros(B + N, **i64)
        seg_pos0[member_slot] = P[member_group]
        # each segment's source row: group for a prefix, member for a suffix
        seg_row = torch.empty(B + N, **i64)
        seg_row[prefix_slot] = torch.arange(B, **i64)
        seg_row[member_slot] = torch.arange(N, **i64)

        lengths, parents = seg_len.tolist(), _group_parents(sizes)  # the segments as a forest of depth 1
        T = int(sum(prefix) + sum(suffix))
        seg_of_token = torch.repeat_interleave(torch.arange(B + N, **i64), seg_len)
        local = torch.arange(T, **i64) - seg_offset[seg_of_token]
        position_ids = local + seg_pos0[seg_of_token]
        is_prefix = seg_is_prefix[seg_of_token]
        suffix_index = torch.nonzero(~is_prefix).squeeze(1)

        suffix_row = seg_row[seg_of_token[suffix_index]]
        suffix_col = local[suffix_index]
        per_group_suffix = torch.zeros(B, **i64).index_add_(0, member_group, S)
        i32 = lambda x: torch.cat([x.new_zeros(1), torch.cumsum(x, 0)]).to(torch.int32)
        return cls(
            prefix_lens=P,
            suffix_lens=S,
            group_sizes=G,
            position_ids=position_ids,
            suffix_index=suffix_index,
            cu_seqlens=seg_offset.to(torch.int32),
            cu_groups=i32(P + per_group_suffix),
            suffix_row=suffix_row,
            suffix_col=suffix_col,
            prompt_start=torch.tensor(start, **i64),
            completion_width=int(width),
            num_tokens=T,
            predecessor=path_predecessors(lengths, parents, device),
            plan=build_plan(lengths, parents, device),
        )

    # ------------------------------------------------------------------ data movement
    def pack(self, prompt_ids: Tensor, completion_ids: Tensor) -> Tensor:
        """prompt_ids: [B, Lp, ...], completion_ids: [N, Lc, ...] -> packed [T, ...]."""
        B, N = self.num_groups, self.num_members
        if prompt_ids.shape[0] != B:
            raise ValueError(f"prompt_ids has {prompt_ids.shape[0]} rows but the layout has {B} groups")
        if completion_ids.shape[0] != N:
            raise ValueError(f"completion_ids has {completion_ids.shape[0]} rows but the layout has {N} members")
        if completion_ids.shape[1] < self.completion_width:
            raise ValueError(
                f"completion_ids is {completion_ids.shape[1]} wide but the layout needs {self.completion_width}"
            )
        Lp = prompt_ids.shape[1]
        if bool((self.prompt_start + self.prefix_lens > Lp).any()):
            raise ValueError(f"prompt_ids is {Lp} wide, too narrow for the layout's prompts")
        if prompt_ids.shape[2:] != completion_ids.shape[2:] or prompt_ids.dtype != completion_ids.dtype:
            raise TypeError(
                f"prompt_ids {tuple(prompt_ids.shape)} {prompt_ids.dtype} and completion_ids "
                f"{tuple(completion_ids.shape)} {completion_ids.dtype} disagree in trailing shape or dtype"
            )
        packed = prompt_ids.new_empty((self.num_tokens, *prompt_ids.shape[2:]))
        is_prefix = torch.ones(self.num_tokens, dtype=torch.bool, device=self.device).index_fill(0, self.suffix_index,
                                                                                                 False)
        group_of_prefix = torch.repeat_interleave(torch.arange(B, device=self.device), self.prefix_lens)
        prefix_pos = self.position_ids[is_prefix]
        packed[is_prefix] = prompt_ids[group_of_prefix, self.prompt_start[group_of_prefix] + prefix_pos]
        packed[self.suffix_index] = completion_ids[self.suffix_row, self.suffix_col]
        return packed

    def to(self, device: torch.device | str) -> "PrefixGroupLayout":
        """The same layout with its tensors on `device`."""
        fields = {k: (v.to(device) if isinstance(v, (Tensor, AttentionPlan)) else v) for k, v in self.__dict__.items()}
        return PrefixGroupLayout(**fields)


def _group_parents(sizes: list[int]) -> list[int]:
    """Each packed segment's parent: -1 for a group's prefix, the prefix's slot for each of its G suffixes."""
    parents: list[int] = []
    for size in sizes:
        slot = len(parents)
        parents += [-1] + [slot] * size
    return parents
