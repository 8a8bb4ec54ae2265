"""Sequence parallelism for prefix-grouped models, on DeepSpeed's Ulysses (Arctic Long Sequence Training).

    dims = ParallelDims(world=dist.get_world_size(), sp=2)
    model = parallelize_sequence(patch_model(model), dims, ds_config)   # every rank; unchanged when dims.sp == 1
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, mpu=sequence_parallel_mpu(dims), ...)
    logps = completion_logprobs(engine, ...)                            # unchanged: [N, Lc], the same on each SP rank

The `sp` consecutive ranks of a sequence-parallel group share each packed row (models/sequence_shards.py): each
forwards a contiguous slice, the attention sees the whole row for `Hq / sp` heads, each rank runs the LM head on the
rows it holds, and every rank gets all the log-probs. Give the ranks of a group the same batch; the data-parallel
size is `dims.dp`.

DeepSpeed's, used as is: the process groups (`parallel_state_sp`: the SP groups and the sequence-data-parallel
group ZeRO partitions and reduces over; passed to `deepspeed.initialize` as the mpu) and the attention exchange
(`UlyssesSPAttentionHF`: all-to-all from sequence shards to head shards and back).

Ours, and why: DeepSpeed's `register_with_transformers` replaces the registered attention function for every
call, but only a packed call with a `sequence_shard` is sharded here; generation and the unpatched fallback run
whole on each rank. So `parallelize_sequence` builds `UlyssesSPAttentionHF` around the grouped attention and gives
it to the patch as the model's packed attention (`set_sequence_parallel`). Around it: attention sinks cut to the
rank's heads, the module's `num_key_value_groups` restored (Ulysses rewrites it when it replicates KV heads, which
would break the next unsharded call), and the gradient scale (:func:`gradient_scale`).
"""
from __future__ import annotations

import warnings

import torch.distributed as dist
from deepspeed.runtime.sequence_parallel import parallel_state_sp
from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
from torch import nn

from pg_deepspeed.distributed.ds_config import zero_stage
from pg_deepspeed.distributed.parallel_dims import ParallelDims
from pg_deepspeed.models.patch import grouped_attention_forward, set_sequence_parallel, unwrap_model
from pg_deepspeed.models.sequence_shards import SequenceParallel, SequenceShard


def parallelize_sequence(model: nn.Module, dims: ParallelDims, ds_config: dict | None = None) -> nn.Module:
    """Shard `model`'s packed forwards over the sequence-parallel groups of `dims`; returns `model`.

    model: a `patch_model`-ed causal LM (built under `zero.Init` or not), or a DeepSpeed engine that was
        initialised with `sequence_parallel_mpu(dims)`. Call it on every rank, for every model that runs packed
        forwards (the policy, a reference): they share the process groups.
    ds_config: the config the engine is (or will be) initialised with (an engine's own by default): its ZeRO
        stage sets the gradient scale (:func:`gradient_scale`); its `sequence_parallel_size`, if written, must
        equal `dims.sp`.
    """
    hf = unwrap_model(model)
    if getattr(hf, "_prefix_grouper", None) is None:
        raise ValueError(f"{type(hf).__name__} is not patched; call pg_deepspeed.patch_model(model) first")
    if not dist.is_initialized():
        raise RuntimeError("parallelize_sequence needs torch.distributed initialised (deepspeed.init_distributed)")
    if dims.world != dist.get_world_size():
        raise ValueError(f"{dims} does not describe the {dist.get_world_size()} ranks of this run")
    dims.check_model(hf.config)
    if ds_config is None:
        ds_config = getattr(model, "config", None)
        if not isinstance(ds_config, dict):
            raise ValueError("pass the DeepSpeed config (ds_config=) that the engine is initialised with")
    written = ds_config.get("sequence_parallel_size", dims.sp)
    if written not in (dims.sp, "auto"):
        raise ValueError(f"the DeepSpeed config's sequence_parallel_size is {written!r} but the size is {dims.sp}")
    engine_size = getattr(model, "sequence_parallel_size", dims.sp)
    if engine_size != dims.sp:
        raise ValueError(f"the DeepSpeed engine was initialised with sequence_parallel_size {engine_size}, not "
                         f"{dims.sp}: parallelize the model first and pass sequence_parallel_mpu(dims) to "
                         "deepspeed.initialize")
    if dims.sp == 1:
        set_sequence_parallel(hf, None)
        return model
    group = sequence_parallel_mpu(dims).get_sequence_parallel_group()
    rank = dist.get_rank(group)
    set_sequence_parallel(hf, SequenceParallel(group, dims.sp, rank, _ulysses_attention(hf, group, dims.sp, rank),
                                               gradient_scale(ds_config, dims.sp)))
    return model


def sequence_parallel_mpu(dims: ParallelDims):
    """DeepSpeed's sequence-parallel process groups (`parallel_state_sp`), set up on the first call, for
    `deepspeed.initialize(..., mpu=...)`; None when `dims.sp` is 1 (nothing to set up)."""
    if dims.sp == 1:
        return None
    try:
        current = parallel_state_sp.get_sequence_parallel_world_size()
    except AssertionError:  # not initialised yet (DeepSpeed asserts)
        parallel_state_sp.initialize_sequence_parallel(sequence_parallel_size=dims.sp)
        current = dims.sp
    if current != dims.sp:
        raise ValueError(f"sequence parallelism is already set up with size {current}; one size per process")
    return parallel_state_sp


def apply_sequence_parallel(model: nn.Module, size: int, ds_config: dict | None = None):
    """Before 0.2: `parallelize_sequence` and the mpu in one call. Kept one release; warns."""
    warnings.warn("apply_sequence_parallel(model, size, ds_config) is now parallelize_sequence(model, dims, "
                  "ds_config) and sequence_parallel_mpu(dims); it goes in the next release", FutureWarning,
                  stacklevel=2)
    dims = ParallelDims(dist.get_world_size(), size)
    parallelize_sequence(model, dims, ds_config)
    return sequence_parallel_mpu(dims)


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


def _ulysses_attention(model: nn.Module, group: dist.ProcessGroup, size: int, rank: int):
    """The model's packed attention under sequence parallelism: a sharded call runs Ulysses' all-to-all around the
    grouped attention over the whole row; an unsharded one (no `sequence_shard`) runs the grouped attention alone."""
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

    def attention(module, query, key, value, prefix_layout, *, sequence_shard: SequenceShard | None = None, **kwargs):
        if sequence_shard is None:
            return grouped_attention_forward(module, query, key, value, prefix_layout, **kwargs)
        if sequence_shard.size != size:
            raise ValueError(f"a sequence_shard of size {sequence_shard.size} on a model parallelized over {size}")
        # Ulysses all-gathers the shard's position ids (it asserts they are passed); ours are the layout's, whatever
        # the modeling code hands on
        kwargs["position_ids"] = prefix_layout.position_ids[None, sequence_shard.start:sequence_shard.stop]
        groups = getattr(module, "num_key_value_groups", None)
        try:
            return ulysses(module, query, key, value, None, prefix_layout=prefix_layout, **kwargs)
        finally:
            if groups is not None:
                module.num_key_value_groups = groups

    return attention
