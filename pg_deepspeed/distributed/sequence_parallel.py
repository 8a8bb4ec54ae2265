"""Sequence parallelism for prefix-grouped models, on DeepSpeed's Ulysses (Arctic Long Sequence Training).

    model = patch_model(model)                                    # or build_model(...): patched, maybe zero.Init
    mpu = apply_sequence_parallel(model, 2, ds_config)            # every rank; None when the size is 1
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, mpu=mpu, ...)
    logps = completion_logprobs(engine, ...)                      # unchanged: [N, Lc], the same on each SP rank

The `size` consecutive ranks of a sequence-parallel group share each packed row (models/sequence_shards.py): each forwards a
contiguous slice, the attention sees the whole row for `Hq / size` heads, each rank runs the LM head on the rows
it holds, and every rank gets all the log-probs. Give the ranks of a group the same batch; the data-parallel
size is `world / size`.

DeepSpeed's, used as is: the process groups (`parallel_state_sp`: the SP groups and the sequence-data-parallel
group ZeRO partitions and reduces over; passed to `deepspeed.initialize` as the mpu) and the attention exchange
(`UlyssesSPAttentionHF`: all-to-all from sequence shards to head shards and back).

Ours, and why: DeepSpeed's `register_with_transformers` replaces the registered attention function for every
call, but only a packed call with a `sequence_shard` is sharded here; generation and the unpatched fallback run
whole on each rank. So we build `UlyssesSPAttentionHF` around the grouped attention and the patch routes sharded
calls to it. Around it: attention sinks cut to the rank's heads, the module's `num_key_value_groups` restored
(Ulysses rewrites it when it replicates KV heads, which would break the next unsharded call), and the gradient
scale (:func:`gradient_scale`).
"""
from __future__ import annotations

import torch.distributed as dist
from deepspeed.runtime.sequence_parallel import parallel_state_sp
from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
from torch import nn

from pg_deepspeed.distributed.ds_config import zero_stage
from pg_deepspeed.distributed.parallel_dims import ParallelDims
from pg_deepspeed.models.patch import grouped_attention_forward, unwrap_model
from pg_deepspeed.models.sequence_shards import SequenceParallel, attach


def gradient_scale(ds_config: dict, size: int) -> float:
    """What the log-prob gather's backward multiplies by so that the engine's update is the unsharded one.

    Each rank of a group computes the same loss from the gathered log-probs; backward puts on each rank the
    gradient through the rows it holds, so the group's gradients add up to the unsharded gradient. The engine
    then reduces over the sequence-data-parallel group. deepspeed 0.19.8 divides that sum by the data-parallel
    size (world / size) everywhere but in ZeRO-3's reduce-scatter path, which divides by the whole group (world):
    there the group's gradients must add up to `size` times the gradient. ZeRO-3 without reduce-scatter picks
    either path by bucket size at run time, so it is refused.
    """
    if zero_stage(ds_config) != 3:
        return 1.0
    if ds_config.get("zero_optimization", {}).get("reduce_scatter", True) is False:
        raise ValueError("sequence parallelism under ZeRO-3 needs zero_optimization.reduce_scatter (the default): "
                         "without it deepspeed 0.19 averages gradients over a bucket-size-dependent group")
    return float(size)


def _ulysses_exchange(model: nn.Module, group: dist.ProcessGroup, size: int, rank: int):
    """The sharded attention call: Ulysses' all-to-all around the grouped attention, over the whole row."""
    text = model.config.get_text_config()
    heads = text.num_attention_heads

    def head_share(module, query, key, value, attention_mask, *, prefix_layout, **kwargs):
        sinks = kwargs.get("s_aux")
        if sinks is not None and sinks.shape[0] == heads:  # rank r holds heads [r * Hq / size, (r + 1) * Hq / size)
            local = query.shape[1]
            kwargs["s_aux"] = sinks[rank * local:(rank + 1) * local]
        return grouped_attention_forward(module, query, key, value, prefix_layout, **kwargs)

    ulysses = UlyssesSPAttentionHF(
        attn=head_share, batch_size=1, attn_head_count=heads,
        attn_head_size=getattr(text, "head_dim", None) or text.hidden_size // heads,
        kv_head_count=getattr(text, "num_key_value_heads", None) or heads,
        num_hidden_layers=text.num_hidden_layers, process_group=group, seq_length_is_variable=True,
    )

    def exchange(module, query, key, value, attention_mask, **kwargs):
        groups = getattr(module, "num_key_value_groups", None)
        try:
            return ulysses(module, query, key, value, attention_mask, **kwargs)
        finally:
            if groups is not None:
                module.num_key_value_groups = groups

    return exchange


def apply_sequence_parallel(model: nn.Module, size: int, ds_config: dict | None = None):
    """Shard `model`'s packed forwards over groups of `size` consecutive ranks; returns the mpu for
    `deepspeed.initialize(..., mpu=mpu)` (None when `size` is 1: nothing changes).

    model: a `patch_model`-ed causal LM (built under `zero.Init` or not), or a DeepSpeed engine that was
        initialised with this size's mpu. Call it on every rank, for every model that runs packed forwards (the
        policy, a reference): they share the process groups.
    ds_config: the config the engine is (or will be) initialised with (an engine's own by default): its ZeRO
        stage sets the gradient scale (:func:`gradient_scale`); its `sequence_parallel_size`, if written, must
        equal `size`.
    """
    hf = unwrap_model(model)
    if getattr(hf, "_prefix_grouper", None) is None:
        raise ValueError(f"{type(hf).__name__} is not patched; call pg_deepspeed.patch_model(model) first")
    if not dist.is_initialized():
        raise RuntimeError("apply_sequence_parallel needs torch.distributed initialised (deepspeed.init_distributed)")
    ParallelDims(dist.get_world_size(), size).check_model(hf.config)
    if ds_config is None:
        ds_config = getattr(model, "config", None)
        if not isinstance(ds_config, dict):
            raise ValueError("pass the DeepSpeed config (ds_config=) that the engine is initialised with")
    written = ds_config.get("sequence_parallel_size", size)
    if written not in (size, "auto"):
        raise ValueError(f"the DeepSpeed config's sequence_parallel_size is {written!r} but the size is {size}")
    engine_size = getattr(model, "sequence_parallel_size", size)
    if engine_size != size:
        raise ValueError(f"the DeepSpeed engine was initialised with sequence_parallel_size {engine_size}, not "
                         f"{size}: apply sequence parallelism to the model and pass the mpu to deepspeed.initialize")
    if size == 1:
        attach(hf, None)
        return None
    try:
        current = parallel_state_sp.get_sequence_parallel_world_size()
    except AssertionError:  # not initialised yet (DeepSpeed asserts)
        parallel_state_sp.initialize_sequence_parallel(sequence_parallel_size=size)
        current = size
    if current != size:
        raise ValueError(f"sequence parallelism is already set up with size {current}; one size per process")
    group = parallel_state_sp.get_sequence_parallel_group()
    rank = dist.get_rank(group)
    attach(hf, SequenceParallel(group, size, rank, _ulysses_exchange(hf, group, size, rank),
                                gradient_scale(ds_config, size)))
    return parallel_state_sp
