"""Per-token log-probs of GRPO completions with each prompt forwarded once per group.

`completion_logprobs` is a drop-in for a GRPO trainer's per-token log-prob function (TRL's
`_get_per_token_logps_and_entropies`). The batch is packed (layouts/packing.py: two levels, or three with a
shared preamble), the patched decoder runs once over `[1, T]`, and the LM head runs only on the Ts rows
that predict completion tokens, a chunk of rows at a time, recomputed chunk by chunk in backward.

Shapes: B prompts, N = sum(G_g) completions, Lp / Lc padded widths, T packed tokens,
Ts = sum of completion lengths, H hidden size, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from pg_deepspeed.layouts.group import GroupSize, group_sizes
from pg_deepspeed.layouts.packing import pack_completions
from pg_deepspeed.models.patch import sequence_parallel_of, unwrap_model
from pg_deepspeed.models.sequence_shards import SequenceParallel, SequenceShard, combine_shards, pad_layout

DEFAULT_CHUNK_SIZE = 512


@dataclass(frozen=True)
class LogitTransform:
    """TRL's logits: `softcap(logits * scale) / temperature` (softcap x -> cap * tanh(x / cap))."""

    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    @classmethod
    def from_config(cls, config: Any, temperature: float) -> "LogitTransform":
        scale = 1.0
        for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
            if getattr(config, name, None) is not None:
                scale = float(getattr(config, name))
                break
        else:
            if getattr(config, "logits_scaling", None) is not None:
                scale = 1.0 / float(config.logits_scaling)
        return cls(scale, getattr(config, "final_logit_softcapping", None), float(temperature))

    def __call__(self, logits: Tensor) -> Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits / self.temperature if self.temperature != 1.0 else logits


def _head_chunk(
    lm_head: nn.Module, hidden: Tensor, targets: Tensor, transform: LogitTransform, with_entropy: bool
) -> tuple[Tensor, Tensor]:
    """hidden: [C, H], targets: [C] -> (log-prob of each target [C], entropy [C] or empty) in float32."""
    logits = transform(lm_head(hidden).float())
    # log_softmax is one fused kernel each way; logsumexp then gather is several passes over [C, V] each way (and
    # its backward adds two [C, V] gradients): 1.4x slower for a 512 x 32000 chunk's forward + backward on CPU
    log_probs = torch.log_softmax(logits, -1)
    logps = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    if not with_entropy:
        return logps, logps.new_empty(0)
    return logps, -(log_probs.exp() * log_probs).sum(-1)


def chunked_head_logprobs(
    lm_head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    transform: LogitTransform,
    chunk_size: int,
    with_entropy: bool,
    *,
    num_calls: int | None = None,
    spare: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """hidden: [R, H], targets: [R] -> (logps [R], entropies [R] or None), float32.

    At most `chunk_size` rows of [., V] logits exist at once, in forward and in backward (each
    chunk is checkpointed and recomputed). `lm_head` is called as a module, never read as a
    weight, so ZeRO-3 gathers it through its hooks.

    num_calls: call the head exactly this many times (>= ceil(R / chunk_size)): the chunks above, then idle calls
        on `spare` ([1, H], a row of the same graph) that enter the result times zero. Under ZeRO-3 every head call is
        a collective (its weight is gathered in forward and in backward), so ranks holding different numbers of rows
        must make the same number of calls (`equal_head_calls`). The chunks themselves never depend on the other
        ranks: a row's log-prob is the same whatever they hold.
    """
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters())
    )
    R = hidden.shape[0]
    bounds = list(range(0, R, chunk_size)) + [R]
    chunks = list(zip(bounds[:-1], bounds[1:]))
    if num_calls is not None:
        if num_calls < len(chunks) or spare is None:
            raise ValueError(f"num_calls={num_calls} cannot cover {R} rows in chunks of {chunk_size} (or no spare)")
        chunks += [(R, R)] * (num_calls - len(chunks))
    logps, entropies, idle = [], [], hidden.new_zeros((), dtype=torch.float32)
    for start, stop in chunks:
        rows, labels = (hidden[start:stop], targets[start:stop]) if stop > start else (spare, targets.new_zeros(1))
        args = (lm_head, rows, labels, transform, with_entropy)
        lp, ent = checkpoint(_head_chunk, *args, use_reentrant=False) if needs_grad else _head_chunk(*args)
        if stop == start:
            idle = idle + 0.0 * (lp.sum() + ent.sum())
            continue
        logps.append(lp)
        entropies.append(ent)
    empty = hidden.new_zeros(0, dtype=torch.float32)
    # the idle calls stay in the graph (also when this rank holds no row), so their backward and its ZeRO-3 gathers
    # run too
    logps = torch.cat(logps) + idle if logps else idle.expand(0)
    if not with_entropy:
        return logps, None
    return logps, (torch.cat(entropies) if entropies else empty)


def _decoder(model: PreTrainedModel) -> nn.Module:
    """The body whose last hidden state feeds the LM head (`get_decoder`, or `.model` where that returns the LM)."""
    decoder = model.get_decoder()
    if decoder is model:
        decoder = getattr(model, "model", None)
    if not isinstance(decoder, nn.Module):
        raise ValueError(f"cannot find the decoder of {type(model).__name__}: get_decoder() returns it, no .model")
    return decoder


def _begin_engine_forward(model: nn.Module) -> None:
    """What a DeepSpeed engine's own `forward` (and its root module's pre-hook) does first, for this pass that
    calls the decoder and the LM head itself; a no-op for a plain model. Duck-typed: this layer imports no DeepSpeed.

    - Micro-batches: ZeRO-3 counts them in `engine.forward` (`optimizer.clear_backward_seen_flag()` advances
      `micro_step_id`, which decides whether a backward's gradients overwrite or accumulate into the partitions):
      without it every micro-batch of a gradient-accumulation step but the last is lost (deepspeed 0.19.8;
      tests/dist/token_mean.py).
    - Prefetch: ZeRO-3 records the order of submodule calls between two calls of the root module (whose pre-hook
      calls the parameter coordinator's `reset_step`) and prefetches by it. A pass that never calls the root module
      never starts a trace step, so an engine that runs only these passes (the frozen reference) would never
      prefetch (deepspeed 0.19.8: `reset_step` is called only from the root module's forward pre-hook). A stage-3
      optimizer holds `parameter_offload`; an optimizer-less engine's
      `optimizer` is that offload object itself.
    """
    optimizer = getattr(model, "optimizer", None)
    clear = getattr(optimizer, "clear_backward_seen_flag", None)
    if callable(clear):
        clear()
    coordinator = getattr(getattr(optimizer, "parameter_offload", optimizer), "get_param_coordinator", None)
    if callable(coordinator):
        coordinator().reset_step()


def _check_inputs(prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor) -> None:
    for name, ids, mask in (("prompt", prompt_ids, prompt_mask), ("completion", completion_ids, completion_mask)):
        if ids.dim() != 2 or ids.shape != mask.shape:
            raise ValueError(
                f"{name}_ids {tuple(ids.shape)} and {name}_mask {tuple(mask.shape)} must be the same 2-D shape"
            )
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"{name}_ids must hold integer token ids, got {ids.dtype}")
    devices = {t.device for t in (prompt_ids, prompt_mask, completion_ids, completion_mask)}
    if len(devices) != 1:
        raise ValueError(f"prompt and completion tensors are on different devices: {sorted(map(str, devices))}")


def _token_logprobs(model: nn.Module, hf: PreTrainedModel, ids: Tensor, layout, targets: Tensor, temperature: float,
                    return_entropy: bool, chunk_size: int) -> tuple[Tensor, Tensor | None]:
    """One packed forward; the LM head on the predecessor of each target token only -> ([R], [R] or None).

    Under sequence parallelism (sequence_shards.py) this rank forwards its share of the padded row, runs the LM head on
    the predecessors it holds, and every rank gets all R values.
    """
    predecessor = layout.predecessor[targets]
    if bool((predecessor < 0).any()):
        raise ValueError("a target is the first token of a root segment: nothing before it predicts it")
    transform = LogitTransform.from_config(hf.config.get_text_config(), temperature)
    sp = sequence_parallel_of(hf)
    _begin_engine_forward(model)
    head = hf.get_output_embeddings()
    if sp is None:
        out = _decoder(hf)(input_ids=ids[None], position_ids=layout.position_ids[None], prefix_layout=layout,
                           use_cache=False)
        hidden = out[0][0]  # [T, H]
        return chunked_head_logprobs(head, hidden[predecessor], ids[targets], transform, chunk_size, return_entropy,
                                     **equal_head_calls(head, int(predecessor.shape[0]), chunk_size, hidden))
    _check_engine_sequence_parallel(model, sp)
    padded = pad_layout(layout, sp.size)
    shard = SequenceShard(sp.rank, sp.size, padded.num_tokens)
    local_ids = torch.nn.functional.pad(ids, (0, padded.num_tokens - ids.shape[0]))[shard.start:shard.stop]
    out = _decoder(hf)(input_ids=local_ids[None], position_ids=padded.position_ids[None, shard.start:shard.stop],
                       prefix_layout=padded, sequence_shard=shard, use_cache=False)
    hidden = out[0][0]  # [L, H]
    mine = (predecessor >= shard.start) & (predecessor < shard.stop)
    logps, entropies = chunked_head_logprobs(head, hidden[predecessor[mine] - shard.start], ids[targets[mine]],
                                             transform, chunk_size, return_entropy,
                                             **equal_head_calls(head, int(mine.sum()), chunk_size, hidden, sp.group))
    return combine_shards(logps, mine, sp), (combine_shards(entropies, mine, sp) if return_entropy else None)


def equal_head_calls(head: nn.Module, rows: int, chunk_size: int, hidden: Tensor, group=None) -> dict:
    """`chunked_head_logprobs`' `num_calls` and `spare` when its calls are collectives, else {} (no idle call).

    The head's calls are collectives when ZeRO-3 partitions its weight (gathered over `ds_process_group` at each
    call, forward and backward) or under sequence parallelism (`group`). The ranks of that group then agree on the
    most calls any of them needs: ranks whose micro-batches hold different numbers of completion tokens (say 500
    and 600 in chunks of 512) would otherwise gather the head a different number of times and their collectives
    stop matching (gloo aborts with "Is there a distributed collective mismatch"; NCCL can hang). One all-reduce
    of an int per pass. Duck-typed (`ds_process_group`): this layer imports no DeepSpeed.
    """
    zero3 = [getattr(p, "ds_process_group", None) for p in head.parameters() if hasattr(p, "ds_numel")]
    if zero3:
        group = zero3[0]
    elif group is None:
        return {}
    calls = torch.tensor([max(1, -(-rows // chunk_size))], dtype=torch.int64,
                         device="cpu" if torch.distributed.get_backend(group) == "gloo" else hidden.device)
    torch.distributed.all_reduce(calls, op=torch.distributed.ReduceOp.MAX, group=group)
    return {"num_calls": int(calls), "spare": hidden[:1]}


def _check_engine_sequence_parallel(model: nn.Module, sp: SequenceParallel) -> None:
    """An engine around a sequence-parallel model must reduce gradients knowing it (duck-typed: no DeepSpeed here)."""
    engine_size = getattr(model, "sequence_parallel_size", None)
    if engine_size is not None and engine_size != sp.size:
        raise ValueError(f"the model runs sequence parallel over {sp.size} ranks but its DeepSpeed engine over "
                         f"{engine_size}: pass sequence_parallel_mpu(dims) to deepspeed.initialize")


def _check_options(temperature: float, chunk_size: int) -> None:
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _patched(model: nn.Module) -> PreTrainedModel:
    """The patched HF model inside `model`, with an LM head; raises naming what is missing."""
    hf = unwrap_model(model)
    if getattr(hf, "_prefix_grouper", None) is None:
        raise ValueError(f"{type(hf).__name__} is not patched; call pg_deepspeed.patch_model(model) first")
    if hf.get_output_embeddings() is None:
        raise ValueError(f"{type(hf).__name__} has no LM head (get_output_embeddings() is None)")
    return hf


def token_logprobs(
    model: nn.Module,
    ids: Tensor,
    layout,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs [R] (float32) of the packed tokens at `targets`, each given everything before it on its path.

    The general form of `completion_logprobs` for any layout: a `PrefixTreeLayout` of multi-turn branches or a
    sampling tree, ids [T] packed in its order (`pack_rows`), targets [R] the packed indices to score (for
    example every assistant token). Same model, temperature and chunking rules as `completion_logprobs`.
    """
    _check_options(temperature, chunk_size)
    hf = _patched(model)
    if ids.dim() != 1 or ids.shape[0] != layout.num_tokens:
        raise ValueError(f"ids must be the packed [T] = [{layout.num_tokens}] token ids, got {tuple(ids.shape)}")
    logps, entropies = _token_logprobs(model, hf, ids, layout, targets.to(ids.device), temperature, return_entropy,
                                       chunk_size)
    return (logps, entropies) if return_entropy else logps


def completion_logprobs(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    group_size: GroupSize,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    prefix_grouping: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    preamble: int = 0,
    share_completions: bool = False,
    score_mask: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs [N, Lc] (float32, 0 where `completion_mask` is 0) of the completion tokens.

    model: a `patch_model`-ed causal LM, or a DeepSpeed engine around one. Pass the engine itself when training
        under DeepSpeed, never `engine.module`: the pass then does the per-micro-batch bookkeeping that the
        engine's own forward does (under ZeRO-3 gradient accumulation depends on it).
    prompt_ids, prompt_mask: [B, Lp], left- or right-padded, one row per group.
    completion_ids, completion_mask: [N, Lc], right-padded, the G_g rows of group g consecutive. A row
        whose mask is all zero (TRL's `mask_truncated_completions`) is computed over the whole width and
        returned as 0: the attention layout and the loss mask are different things.
    group_size: G for every group, or a list of B sizes.
    temperature: logits are scaled (config logit scale), soft-capped (`final_logit_softcapping`)
        and divided by it, as TRL does.
    return_entropy: also return the differentiable entropies [N, Lc] (0 at padding).
    prefix_grouping: False runs the standard forward through the same code, each member as its own
        `prompt + completion` (prompt repeated G times), packed without padding: the A/B baseline.
    chunk_size: rows of the LM head computed at once.
    preamble: > 0 also shares the first `preamble` tokens of every prompt (a system prompt or few-shot preamble
        they all begin with; see `packing.common_prefix_length`): computed once for the micro-batch, a
        three-level tree. Ignored with `prefix_grouping=False`.
    share_completions: also compute once what a group's completions begin with in common: the earlier turns of a
        multi-turn rollout sampled as a tree (`--branching`), found by comparing the completions, a tree at any
        depth. Ignored with `prefix_grouping=False`.
    score_mask: [N, Lc], the completion tokens to score (default: `completion_mask`'s); the others are context only
        (a multi-turn rollout's observations and template text): attended to, never through the LM head, 0 in the
        result. Must lie within `completion_mask`.
    """
    _check_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    if score_mask is not None and (score_mask.shape != completion_mask.shape
                                   or bool((score_mask.bool() & ~completion_mask.bool()).any())):
        raise ValueError(f"score_mask {tuple(score_mask.shape)} must mark completion tokens only (within "
                         f"completion_mask {tuple(completion_mask.shape)})")
    sizes = group_sizes(group_size, prompt_ids.shape[0], completion_ids.shape[0])
    _check_options(temperature, chunk_size)
    if isinstance(preamble, bool) or not isinstance(preamble, int) or preamble < 0:
        raise ValueError(f"preamble must be a non-negative int, got {preamble!r}")
    hf = _patched(model)

    if not prefix_grouping:
        repeats = torch.tensor(sizes, device=prompt_ids.device)
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(repeats, 0), prompt_mask.repeat_interleave(repeats, 0)
        sizes = [1] * len(completion_ids)
        preamble, share_completions = 0, False
    packing = pack_completions(prompt_ids, prompt_mask, completion_ids, completion_mask, sizes, preamble,
                               share_completions)
    # the layout may hold tokens the loss mask drops (all-zero rows, see `from_masks`): 0 there, as TRL has it
    keep = (completion_mask if score_mask is None else score_mask).bool()
    scored = keep[packing.rows, packing.cols]  # [Ts] which packed completion tokens go through the LM head
    targets, rows, cols, copies = packing.targets[scored], packing.rows[scored], packing.cols[scored], None
    if share_completions:  # a shared turn's tokens go through the LM head once; each member reads its copy
        targets, copies = torch.unique(targets, return_inverse=True)
    logps, entropies = _token_logprobs(model, hf, packing.ids, packing.layout, targets, temperature,
                                       return_entropy, chunk_size)
    if copies is not None:
        logps, entropies = logps[copies], (entropies[copies] if return_entropy else None)
    unpack = lambda x: x.new_zeros(completion_mask.shape).index_put((rows, cols), x)  # [N, Lc], differentiable
    if not return_entropy:
        return unpack(logps)
    return unpack(logps), unpack(entropies)
