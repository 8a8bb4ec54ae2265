"""The attention plan of a packed forest of segments: which varlen passes prefix-grouped attention runs.

Segments are listed in packed order, every parent before its children. A token attends causally within its
segment and fully to every ancestor's tokens. Two kernel calls cover any depth:

- causal pass: one causal varlen call over "runs", maximal chains parent → only child that sit next to each
  other in the packed order (a chain is one causal sequence: the child sees its whole parent, the parent
  none of the child);
- cross pass: one non-causal varlen call with one sequence per run `a` that has descendants: its keys are
  a's tokens (each run's K/V gathered once), its queries every token of every run below a. A token of depth
  d (d runs above it) is a query row d times, once per ancestor run; its partial results merge by
  log-sum-exp (`attention.merge.merge_rows`).

One pass per depth level would need d+1 calls for depth d and the same gathers; the single cross call costs
the same FLOPs and bytes in one launch, so it is the one with the fewest kernel calls for every depth.

| field        | shape    | meaning                                                          |
|--------------|----------|------------------------------------------------------------------|
| cu_causal    | [C+1]    | int32 offsets of the runs (they tile the packed row in order)     |
| cross_q      | [Rq]     | packed index of each cross-pass query row (a token once per ancestor run) |
| cross_k      | [Rk]     | packed index of each cross-pass key row (the tokens of runs with descendants) |
| cu_cross_q   | [A+1]    | int32 offsets of each ancestor run's queries within cross_q       |
| cu_cross_k   | [A+1]    | int32 offsets of each ancestor run's keys within cross_k          |
| num_tokens   | int      | T, the packed row's length                                        |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    cu_causal: Tensor
    max_causal: int
    cross_q: Tensor
    cross_k: Tensor
    cu_cross_q: Tensor
    cu_cross_k: Tensor
    max_cross_q: int
    max_cross_k: int
    cross_rows_unique: bool  # no run has two ancestor runs: every row is a cross query at most once
    num_tokens: int  # T: the runs tile the packed row [0, T)

    @property
    def device(self) -> torch.device:
        return self.cu_causal.device

    @property
    def has_cross(self) -> bool:
        return self.cross_q.numel() > 0

    def to(self, device: torch.device | str) -> "AttentionPlan":
        fields = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return AttentionPlan(**fields)


def runs_to_index(starts: list[int], lengths: list[int], device: torch.device) -> Tensor:
    """Concatenation of range(start, start + length) for each run, as one long tensor."""
    i64 = dict(dtype=torch.long, device=device)
    lens = torch.tensor(lengths, **i64)
    total = int(lens.sum()) if lengths else 0
    if total == 0:
        return torch.zeros(0, **i64)
    base = torch.repeat_interleave(torch.tensor(starts, **i64) - (torch.cumsum(lens, 0) - lens), lens)
    return base + torch.arange(total, **i64)


def _offsets(lengths: list[int], device: torch.device) -> Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def build_plan(lengths: Sequence[int], parents: Sequence[int], device: torch.device) -> AttentionPlan:
    """The plan of segments with `lengths[s]` tokens and parent `parents[s]` (-1 for a root), in packed order.

    The caller has validated the forest (parents before children, lengths >= 1).
    """
    S = len(lengths)
    children = [0] * S
    for p in parents:
        if p >= 0:
            children[p] += 1
    # runs: a segment joins its parent's run when it directly follows it and is its only child
    run_of, run_first, run_len, run_parent = [0] * S, [], [], []
    offset, seg_start = 0, []
    for s in range(S):
        seg_start.append(offset)
        offset += lengths[s]
        p = parents[s]
        if p >= 0 and p == s - 1 and children[p] == 1:
            run_of[s] = run_of[p]
            run_len[run_of[s]] += lengths[s]
        else:
            run_of[s] = len(run_first)
            run_first.append(seg_start[s])
            run_len.append(lengths[s])
            run_parent.append(run_of[p] if p >= 0 else -1)
    # every run's ancestor runs, nearest last (parents come first, so theirs are known)
    ancestors: list[list[int]] = []
    for r, p in enumerate(run_parent):
        ancestors.append([] if p < 0 else ancestors[p] + [p])
    below: dict[int, list[int]] = {}
    for r, anc in enumerate(ancestors):
        for a in anc:
            below.setdefault(a, []).append(r)
    owners = sorted(below)  # runs with descendants, in packed order
    q_runs = [r for a in owners for r in below[a]]
    return AttentionPlan(
        cu_causal=_offsets(run_len, device),
        max_causal=max(run_len),
        cross_q=runs_to_index([run_first[r] for r in q_runs], [run_len[r] for r in q_runs], device),
        cross_k=runs_to_index([run_first[a] for a in owners], [run_len[a] for a in owners], device),
        cu_cross_q=_offsets([sum(run_len[r] for r in below[a]) for a in owners], device),
        cu_cross_k=_offsets([run_len[a] for a in owners], device),
        max_cross_q=max((sum(run_len[r] for r in below[a]) for a in owners), default=0),
        max_cross_k=max((run_len[a] for a in owners), default=0),
        cross_rows_unique=all(len(anc) <= 1 for anc in ancestors),
        num_tokens=offset,
    )


def path_predecessors(lengths: Sequence[int], parents: Sequence[int], device: torch.device) -> Tensor:
    """[T] packed index of the token before each token on its path: the one before it in its segment, or its
    parent's last token for a segment's first token; -1 for the first token of a root. The hidden state there
    is what predicts the token (next-token log-probs)."""
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    T = starts[-1]
    before = torch.arange(-1, T - 1, dtype=torch.long, device=device)
    firsts = torch.tensor(starts[:-1], dtype=torch.long, device=device)
    parent_last = torch.tensor([starts[p + 1] - 1 if p >= 0 else -1 for p in parents], dtype=torch.long,
                               device=device)
    return before.index_copy(0, firsts, parent_last)
