"""The packed layout of a prefix tree: shared segments at any depth, each computed once.

A forest of S token segments, packed in the order they are listed, every parent before its children. Every
root-to-node path is a sequence: a token attends causally within its segment and fully to every ancestor's
tokens, and its position continues where its parent's last token stands. `PrefixGroupLayout` is the
two-level case (prompt → G completions); this one takes a batch-wide preamble, multi-turn branches or any
sampling tree.

| field         | shape  | meaning                                                        |
|---------------|--------|----------------------------------------------------------------|
| lengths       | [S]    | tokens of each segment                                         |
| parents       | [S]    | parent segment, -1 for a root                                  |
| cu_segments   | [S+1]  | int32 offsets of the segments in the packed row                |
| position_ids  | [T]    | position along the token's path                                |
| depth         | [S]    | ancestors of each segment                                      |
| predecessor   | [T]    | packed index of the token before each one on its path (-1 first) |
| row_leaf      | [R]    | `from_rows` only: the segment each input row ends in           |
| plan          |        | the attention passes (attention_plan.py)                       |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from pg_deepspeed.layouts.attention_plan import AttentionPlan, build_plan, path_predecessors, runs_to_index


def prefix_tokens_saved(parents: Sequence[int], lengths: Sequence[int]) -> int:
    """Tokens a forward of every root-to-leaf path on its own computes beyond the packed forest: the sum of the leaf
    paths' lengths minus the forest's tokens (each shared segment's repeats). Every layout counts its saving here."""
    path, has_child = [0] * len(parents), [False] * len(parents)
    for s, (p, n) in enumerate(zip(parents, lengths)):
        path[s] = n + (path[p] if p >= 0 else 0)
        if p >= 0:
            has_child[p] = True
    return sum(n for n, inner in zip(path, has_child) if not inner) - sum(lengths)


@dataclass(frozen=True, eq=False)
class PrefixTreeLayout:
    """Index tensors of a packed prefix tree; build it with `from_parents` or `from_rows`."""

    lengths: Tensor
    parents: Tensor
    cu_segments: Tensor
    position_ids: Tensor
    depth: Tensor
    predecessor: Tensor
    plan: AttentionPlan
    num_tokens: int
    longest_path: int
    row_leaf: Tensor | None = None

    @property
    def num_segments(self) -> int:
        return self.lengths.numel()

    def segments(self) -> tuple[list[int], list[int]]:
        """(parents, lengths) of the segments, as `from_parents` takes them."""
        return self.parents.tolist(), self.lengths.tolist()

    @property
    def prefix_tokens_saved(self) -> int:
        """Tokens the forward of each root-to-leaf path on its own would recompute (:func:`prefix_tokens_saved`)."""
        return prefix_tokens_saved(*self.segments())

    @property
    def device(self) -> torch.device:
        return self.position_ids.device

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_parents(cls, parents: Sequence[int], lengths: Sequence[int],
                     device: torch.device | str | None = None) -> "PrefixTreeLayout":
        """Segment s has `lengths[s]` tokens and parent `parents[s]` (-1 for a root), listed before s."""
        parents, lengths = [int(p) for p in parents], [int(n) for n in lengths]
        if len(parents) != len(lengths):
            raise ValueError(f"parents lists {len(parents)} segments but lengths lists {len(lengths)}")
        if not parents:
            raise ValueError("a prefix tree needs at least one segment")
        for s, (p, n) in enumerate(zip(parents, lengths)):
            if n < 1:
                raise ValueError(f"segment {s} is empty (length {n}); every segment needs >= 1 token")
            if p < -1 or p >= len(parents):
                raise ValueError(f"segment {s} names parent {p}, which does not exist (segments 0..{len(parents) - 1})")
            if p >= s:
                raise ValueError(
                    f"segment {s} names parent {p}, which is not listed before it (list parents first; "
                    "a parent listed after its child is also how a cycle shows)"
                )
        return cls._build(parents, lengths, torch.device(device or "cpu"))

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[int] | Tensor], *, min_shared: int = 1,
                  device: torch.device | str | None = None) -> "PrefixTreeLayout":
        """The tree of the shared prefixes of `rows` (one full token sequence each), found by a trie.

        A prefix shared by several rows becomes one segment when it is at least `min_shared` tokens long;
        shorter ones are repeated in each branch (sharing them saves less than it costs). Identical rows share
        a leaf. `row_leaf[r]` is the segment row r ends in; `pack_rows(rows)` gives the packed ids.
        """
        if min_shared < 1:
            raise ValueError(f"min_shared must be >= 1, got {min_shared}")
        tokens = [[int(t) for t in (row.tolist() if isinstance(row, Tensor) else row)] for row in rows]
        for r, row in enumerate(tokens):
            if not row:
                raise ValueError(f"row {r} is empty; every row needs >= 1 token")
        parents, lengths, leaf = [], [], [0] * len(tokens)

        def emit(parent: int, start: int, end: int) -> int:
            parents.append(parent)
            lengths.append(end - start)
            return len(parents) - 1

        def grow(members: list[int], start: int, col: int, parent: int) -> None:
            """members share tokens[:col]; tokens[start:col] are not in a segment yet."""
            while all(len(tokens[m]) > col for m in members) and len({tokens[m][col] for m in members}) == 1:
                col += 1
            ending = [m for m in members if len(tokens[m]) == col]
            branches: dict[int, list[int]] = {}
            for m in members:
                if len(tokens[m]) > col:
                    branches.setdefault(tokens[m][col], []).append(m)
            paths = (1 if ending else 0) + len(branches)
            if col > start and (paths == 1 or col - start >= min_shared):
                node = emit(parent, start, col)
                for m in ending:
                    leaf[m] = node
                for branch in branches.values():
                    grow(branch, col, col, node)
                return
            if ending:  # too short to share: the rows ending here get their own copy
                node = emit(parent, start, col)
                for m in ending:
                    leaf[m] = node
            for branch in branches.values():
                grow(branch, start, col, parent)

        grow(list(range(len(tokens))), 0, 0, -1)
        layout = cls.from_parents(parents, lengths, device)
        return cls(**{**layout.__dict__, "row_leaf": torch.tensor(leaf, dtype=torch.long, device=layout.device)})

    @classmethod
    def _build(cls, parents: list[int], lengths: list[int], device: torch.device) -> "PrefixTreeLayout":
        S = len(parents)
        start_pos, depth = [0] * S, [0] * S
        for s, p in enumerate(parents):
            if p >= 0:
                start_pos[s] = start_pos[p] + lengths[p]
                depth[s] = depth[p] + 1
        i64 = dict(dtype=torch.long, device=device)
        lens = torch.tensor(lengths, **i64)
        T = int(lens.sum())
        seg_of_token = torch.repeat_interleave(torch.arange(S, **i64), lens)
        cu = torch.cat([lens.new_zeros(1), torch.cumsum(lens, 0)])
        local = torch.arange(T, **i64) - cu[seg_of_token]
        return cls(
            lengths=lens,
            parents=torch.tensor(parents, **i64),
            cu_segments=cu.to(torch.int32),
            position_ids=torch.tensor(start_pos, **i64)[seg_of_token] + local,
            depth=torch.tensor(depth, **i64),
            predecessor=path_predecessors(lengths, parents, device),
            plan=build_plan(lengths, parents, device),
            num_tokens=T,
            longest_path=max(s + n for s, n in zip(start_pos, lengths)),
        )

    # ------------------------------------------------------------------ data movement
    def path(self, segment: int) -> list[int]:
        """The segments from a root down to `segment`, root first."""
        chain, parents = [], self.parents.tolist()
        while segment >= 0:
            chain.append(segment)
            segment = parents[segment]
        return chain[::-1]

    def path_index(self, leaves: Sequence[int] | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Packed positions along each path ending in `leaves` (default `row_leaf`): ([R, Lmax] with -1 past the
        end, lengths [R]). `x[index[r, :n_r]]` is what row r's forward alone computes, for x: [T, ...] packed."""
        leaves = self._leaves(leaves)
        cu, lengths = self.cu_segments.tolist(), self.lengths.tolist()
        paths = [self.path(leaf) for leaf in leaves]
        rows = [runs_to_index([cu[s] for s in path], [lengths[s] for s in path], self.device) for path in paths]
        width = max(r.numel() for r in rows)
        index = torch.full((len(rows), width), -1, dtype=torch.long, device=self.device)
        for r, row in enumerate(rows):
            index[r, : row.numel()] = row
        return index, torch.tensor([r.numel() for r in rows], dtype=torch.long, device=self.device)

    def pack_rows(self, rows: Sequence[Sequence[int] | Tensor], leaves: Sequence[int] | Tensor | None = None) -> Tensor:
        """Token ids [T] of the packed tree from full rows (row r is the path ending in `leaves[r]`, default
        `row_leaf`). Every segment must be covered, and rows through one segment must agree on its tokens."""
        leaves = self._leaves(leaves)
        if len(rows) != len(leaves):
            raise ValueError(f"{len(rows)} rows for {len(leaves)} leaves")
        index, lengths = self.path_index(leaves)
        packed = torch.full((self.num_tokens,), -1, dtype=torch.long, device=self.device)
        owner = [-1] * self.num_segments
        seg_of = torch.repeat_interleave(torch.arange(self.num_segments, device=self.device), self.lengths).tolist()
        for r, row in enumerate(rows):
            row = torch.as_tensor(row, dtype=torch.long, device=self.device)
            if row.numel() != int(lengths[r]):
                raise ValueError(f"row {r} has {row.numel()} tokens but its path (to segment {leaves[r]}) has "
                                 f"{int(lengths[r])}")
            where = index[r, : row.numel()]
            seen = packed[where]
            clash = (seen >= 0) & (seen != row)
            if bool(clash.any()):
                segment = seg_of[int(where[clash.nonzero()[0, 0]])]
                raise ValueError(f"row {r} disagrees with row {owner[segment]} on the tokens of shared segment "
                                 f"{segment}: the tree does not match the tokens")
            packed[where] = row
            for s in self.path(leaves[r]):
                owner[s] = r if owner[s] < 0 else owner[s]
        missing = [s for s, o in enumerate(owner) if o < 0]
        if missing:
            raise ValueError(f"segments {missing} lie on no row's path")
        return packed

    def _leaves(self, leaves) -> list[int]:
        if leaves is None:
            if self.row_leaf is None:
                raise ValueError("pass leaves: this layout was not built from rows")
            leaves = self.row_leaf
        leaves = [int(x) for x in (leaves.tolist() if isinstance(leaves, Tensor) else leaves)]
        for leaf in leaves:
            if not 0 <= leaf < self.num_segments:
                raise ValueError(f"leaf {leaf} is not a segment (0..{self.num_segments - 1})")
        return leaves

    def to(self, device: torch.device | str) -> "PrefixTreeLayout":
        """The same layout with its tensors on `device`."""
        fields = {k: (v.to(device) if isinstance(v, (Tensor, AttentionPlan)) else v) for k, v in self.__dict__.items()}
        return PrefixTreeLayout(**fields)
