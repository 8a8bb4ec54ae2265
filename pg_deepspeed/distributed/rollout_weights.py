"""ZeRO-3 generation: gather the policy's full weights once per rollout instead of once per layer per token.

Under ZeRO-3 each rank holds 1/world of every parameter. A forward's module hooks all-gather a layer's weights
before it runs and free them after, so decoding T tokens all-gathers every layer T times, one token's worth of
compute per collective. `--rollout_gather` chooses:

| mode        | weights held during the rollout          | collectives per rollout                       |
|-------------|------------------------------------------|-----------------------------------------------|
| `full`      | all of them, on every rank (+ M bytes,   | one all-gather of the model, then none per    |
| (default)   | M = parameters × bytes per parameter,    | token (the loop's one all-reduce of "done"    |
|             | minus the rank's 1/world shard)          | per token remains)                            |
| `per_layer` | one layer at a time (ZeRO-3's usual)     | every layer's all-gather at every token       |

`full` is the fast choice when M fits beside the decode cache and activations: e.g. a 7B model in bf16 adds
about 15 GB per GPU for the length of the rollout, freed (re-partitioned) after it. Where it does not fit, choose
`per_layer`. Outside ZeRO-3 (stages 0-2 keep full weights) both modes are the same.

How: `deepspeed.zero.GatheredParameters` over the model's parameters, with the engine's ZeRO-3 forward/backward
module hooks removed inside it (left in place they would re-partition each layer after its forward, and gather it
again at the next token). The hooks are registered again on exit through the engine's own
`DeepSpeedZeRoOffload._register_deepspeed_module` (deepspeed 0.19.8: it invalidates the parameter coordinator's
trace so the next training forward records a fresh one). That method is private: DeepSpeed has no public switch
for "forward without the ZeRO-3 hooks", so this is ours.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import deepspeed
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

GATHER_MODES = ("full", "per_layer")


def _zero3_offload(engine):
    """The engine's ZeRO-3 parameter offload (owner of the module hooks), or None outside ZeRO-3."""
    if getattr(engine, "zero_optimization_stage", lambda: 0)() != 3:
        return None
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)  # the stage-3 optimizer, or the offload itself
    if offload is None or not hasattr(offload, "forward_hooks") or not hasattr(offload, "_register_deepspeed_module"):
        raise RuntimeError(f"a ZeRO-3 engine without the expected parameter offload (got {type(offload).__name__}); "
                           "use --rollout_gather per_layer")
    return offload


@contextmanager
def gathered_for_generation(engine, mode: str = "full") -> Iterator[None]:
    """Inside: forwards of `engine.module` run on full weights gathered once (mode "full") or ZeRO-3's per-layer
    gathering ("per_layer"). Collective in "full" mode under ZeRO-3: every rank enters and leaves together."""
    if mode not in GATHER_MODES:
        raise ValueError(f"rollout gather mode must be one of {GATHER_MODES}, got {mode!r}")
    offload = _zero3_offload(engine) if mode == "full" else None
    if offload is None:
        yield
        return
    params = list(engine.module.parameters())
    # settle what the last forward left gathered or in flight (ZeRO-3 prefetches ahead along its recorded trace);
    # without this, a parameter still in flight when the hooks go is gathered again inside the first forward
    engine.empty_partition_cache()
    with deepspeed.zero.GatheredParameters(params):
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
            if any(p.ds_status != ZeroParamStatus.AVAILABLE for p in params):
                raise RuntimeError("a parameter was re-partitioned during the gathered rollout")
        finally:
            for p in params:
                p.ds_active_sub_modules.clear()
            offload._register_deepspeed_module(offload.module)
