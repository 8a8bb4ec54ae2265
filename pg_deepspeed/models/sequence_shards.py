"""Sequence sharding of a packed forward: what each sequence-parallel rank holds, and how the pieces come back.

Under sequence parallelism (`pg_deepspeed.distributed.sequence_parallel`, on DeepSpeed's Ulysses) the `size` ranks of a
group share one packed row `[1, T]`:

| step                         | each rank holds                                   | where                        |
|------------------------------|---------------------------------------------------|------------------------------|
| pad                          | the layout + one root segment of `pad` tokens      | `pad_layout` (T -> Tp)       |
| embed, MLP, norms            | tokens `[r*L, (r+1)*L)`, L = Tp / size             | the decoder, unchanged       |
| attention                    | all Tp tokens for Hq / size heads                  | Ulysses' all-to-all around   |
|                              |                                                    | the grouped attention        |
| LM head                      | the completion-predicting rows among its L         | `logprobs._token_logprobs`   |
| log-probs                    | all R of them                                      | `combine_shards`             |

The pad is its own root segment, so no real token attends to it and it attends to no real token. Every rank
builds the same (full, padded) layout; a prompt may be split across ranks, the attention sees it whole.
This module is torch only: the distributed layer builds a :class:`SequenceParallel` and the patch keeps it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from pg_deepspeed.layouts.group import PrefixGroupLayout
from pg_deepspeed.layouts.tree import PrefixTreeLayout

Layout = PrefixGroupLayout | PrefixTreeLayout


@dataclass(frozen=True)
class SequenceShard:
    """Rank `rank` of `size` holds packed tokens [start, stop) of a row of `total` (a multiple of `size`)."""

    rank: int
    size: int
    total: int

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.size and self.total % self.size == 0):
            raise ValueError(f"rank {self.rank} of {self.size} cannot hold an equal share of {self.total} tokens")

    @property
    def length(self) -> int:
        return self.total // self.size

    @property
    def start(self) -> int:
        return self.rank * self.length

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class SequenceParallel:
    """What a patched model needs to run its packed forwards sharded (built by the distributed layer's
    `parallelize_sequence`, kept in the patch's state).

    attention: `(module, query, key, value, prefix_layout, *, sequence_shard=None, **kwargs) -> (out, None)`, the
        model's packed attention: with a shard, q: [1, Hq, L, D] holds the rank's L tokens and the grouped attention
        runs on the whole sequence for a share of the heads (DeepSpeed's Ulysses all-to-all); without, the whole row.
    grad_scale: what the backward of `combine_shards` multiplies by, so that the gradients the engine reduces over
        the group add up to the unsharded gradient (see `sequence_parallel.gradient_scale`).
    """

    group: dist.ProcessGroup
    size: int
    rank: int
    attention: Callable
    grad_scale: float = 1.0


def pad_layout(layout: Layout, multiple: int) -> Layout:
    """`layout` with one more root segment of pad tokens so that its length is a multiple of `multiple`.

    The result is a `PrefixTreeLayout` over the same segments (in the same packed order, so every real token keeps
    its index, position and attention) plus the pad; `layout` itself when no pad is needed.
    """
    pad = -layout.num_tokens % multiple
    if pad == 0:
        return layout
    parents, lengths = layout.segments()
    return PrefixTreeLayout.from_parents(parents + [-1], lengths + [pad], device=layout.device)


class _CombineShards(torch.autograd.Function):
    """Each rank holds the values of some of R positions; every rank gets all R.

    forward:  y = sum_r scatter_r(x_r)  (an all-reduce of disjoint parts: exact)
    backward: dL/dx_r = grad_scale * (dL/dy)[mine_r]  (every rank's loss is the same function of y, so the local
              rows' gradient is the shared one; grad_scale undoes the engine's averaging over the group)
    """

    @staticmethod
    def forward(ctx, x: Tensor, mine: Tensor, group: dist.ProcessGroup, grad_scale: float) -> Tensor:
        ctx.save_for_backward(mine)
        ctx.grad_scale = grad_scale
        full = x.new_zeros(mine.shape[0])
        full[mine] = x
        dist.all_reduce(full, group=group)
        return full

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mine,) = ctx.saved_tensors
        return grad[mine] * ctx.grad_scale, None, None, None


def combine_shards(x: Tensor, mine: Tensor, sp: SequenceParallel) -> Tensor:
    """x: [M] this rank's values at the positions where `mine` ([R] bool) is True -> [R], the same on every rank."""
    return _CombineShards.apply(x, mine, sp.group, sp.grad_scale)


def check_head_split(config: Any, size: int, name: str = "") -> None:
    """Refuse (ValueError, starting with `name` and the size) `size` ranks that do not split the model's attention
    heads: the query heads must divide by it, and the key/value heads divide by it or it by them (each then held by
    several ranks). Ulysses (--sequence_parallel_size) and vLLM's tensor parallelism split heads alike."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % size:
        raise ValueError(f"{name}{size} does not divide the model's {heads} attention heads")
    if kv_heads % size and size % kv_heads:
        raise ValueError(f"{name}{size} and the model's {kv_heads} key/value heads: neither divides the other")
