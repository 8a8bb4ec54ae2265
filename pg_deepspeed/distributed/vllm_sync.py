"""The policy's weights into the colocated vLLM engine, streamed from ZeRO-3 one decoder layer at a time.

Under ZeRO-3 each rank holds 1/world of every parameter. A sync walks the model's parameters in order, cut into
groups: every parameter under one numbered block (`model.layers.7.*`: attention, MLP, MoE experts, norms) is one
group, every other parameter (embeddings, final norm, LM head) a group of its own. Each group is all-gathered
(`deepspeed.zero.GatheredParameters`, read-only), handed to the engine under its Hugging Face names, and
re-partitioned before the next group is gathered, so the trainer never holds a second whole model beside the
engine's copy: the extra memory is about one group (the largest of one decoder layer and the embedding matrix),
plus what vLLM buffers for the layer being loaded. Tied weights appear once (the LM head tied to the embeddings is
the embeddings' parameter; vLLM skips `lm_head.weight` when the config ties it). Fused projections (q/k/v, gate/up)
and MoE experts are vLLM's to map from the Hugging Face names, which is why a whole block travels in one group: vLLM
processes a fused layer once all its parts have arrived.

Collective: every rank walks the same groups in the same order (each gather is an all-gather over all ranks).
Outside ZeRO-3 (stages 0-2 keep full weights) `GatheredParameters` does nothing and the same code runs.

Test hook (not an option): `PG_DEEPSPEED_VLLM_SKIP_SYNC=NAME[:FROM]` leaves the parameter NAME (or `*`, all of them)
out of every sync from the FROM-th on (default 1, the first), so that a test can break the sync on purpose.
"""
from __future__ import annotations

import os
import re
import time
import deepspeed
import torch

from pg_deepspeed.distributed.peak_memory import PeakMemory
from pg_deepspeed.generation.vllm_engine import VLLMEngine

SKIP_ENV = "PG_DEEPSPEED_VLLM_SKIP_SYNC"
_BLOCK = re.compile(r"^(.*?\.\d+)\.")  # the first numbered component: "model.layers.7." -> "model.layers.7"


def parameter_groups(module: torch.nn.Module) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """`module`'s parameters (each once, tied ones under their first name) in order, grouped: one group per
    numbered block (`model.layers.N`), one per other parameter."""
    groups: list[list[tuple[str, torch.nn.Parameter]]] = []
    last_block = None
    for name, param in module.named_parameters():  # remove_duplicate=True: a tied weight once
        match = _BLOCK.match(name)
        block = match.group(1) if match else None
        if block is not None and block == last_block:
            groups[-1].append((name, param))
        else:
            groups.append([(name, param)])
        last_block = block
    return groups


def checkpoint_names(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (in-memory names) under the names and layout of the model's checkpoint, which is what vLLM's loaders
    read: transformers 5 converts some checkpoint weights when it loads them (a MoE layer's per-expert
    `experts.{e}.gate_proj/up_proj/down_proj.weight` become fused 3-D `experts.gate_up_proj` / `experts.down_proj`;
    Mixtral's `block_sparse_moe` becomes `mlp`), and `save_pretrained` reverts that with `revert_weight_conversion`,
    applied here to one group at a time (a conversion never spans two blocks). Models without conversions (Llama,
    Qwen2, ...) pass through unchanged. Measured with vllm 0.32: its Qwen3-MoE loader also takes the fused names, its
    Mixtral loader does not ("There is no module or parameter named 'layers.0.mlp'")."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(module, tensors) if tensors else {}


def skipped_names(sync_index: int, names: list[str]) -> set[str]:
    """The names the test hook (:data:`SKIP_ENV`) leaves out of sync number `sync_index` (1-based)."""
    value = os.environ.get(SKIP_ENV, "")
    if not value:
        return set()
    name, _, start = value.partition(":")
    if sync_index < int(start or 1):
        return set()
    return set(names) if name == "*" else {name}


class WeightSync:
    """Streams the policy engine's weights into a :class:`VLLMEngine`; one instance per run.

    `sync(policy)` returns {"weight_sync_time_s", "weight_sync_peak_mem_bytes", "weight_sync_bytes"}: the wall time,
    the peak memory above the start (:class:`PeakMemory`: CUDA allocated, or CPU peak RSS) and the bytes sent."""

    def __init__(self, engine: VLLMEngine, device: torch.device) -> None:
        self.engine = engine
        self.device = device
        self.count = 0

    def sync(self, policy) -> dict:
        """Every parameter of `policy` (a DeepSpeed engine or a plain module) into the engine. Collective."""
        module = getattr(policy, "module", policy)
        self.count += 1
        skip = skipped_names(self.count, [n for n, _ in module.named_parameters()])
        start, sent = time.perf_counter(), 0
        with PeakMemory(self.device) as peak, torch.no_grad():
            with self.engine.weight_update() as load:
                for group in parameter_groups(module):
                    with deepspeed.zero.GatheredParameters([p for _, p in group]):  # modifier_rank None: read-only
                        weights = checkpoint_names(module, {name: p.data for name, p in group if name not in skip})
                        if weights:
                            load(list(weights.items()))
                        sent += sum(t.numel() * t.element_size() for t in weights.values())
        return {"weight_sync_time_s": time.perf_counter() - start, "weight_sync_peak_mem_bytes": float(peak.bytes),
                "weight_sync_bytes": float(sent)}

