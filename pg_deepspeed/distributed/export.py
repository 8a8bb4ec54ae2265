"""Export a trained engine as a Hugging Face directory, through the libraries that already do it.

DeepSpeed consolidates the weights (``_zero3_consolidated_16bit_state_dict``: one module gathered at a time into
rank 0's CPU memory, tied weights kept tied; the config's ``stage3_gather_16bit_weights_on_model_save`` must be
true), and transformers writes them (``save_pretrained``: sharded safetensors with an index, tied weights once,
checkpoint key conversions reverted), with the config, generation config and tokenizer beside them.
"""
from __future__ import annotations

import deepspeed
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from pg_deepspeed.models.patch import unwrap_model


def export_hf(
    engine: deepspeed.DeepSpeedEngine, tokenizer: PreTrainedTokenizerBase | None, out_dir: str, *,
    max_shard_size: str | int = "5GB",
) -> None:
    """Write ``out_dir`` so that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads the engine's weights.

    Collective: every rank must call it. Weights keep the engine's training dtype; the config is saved with
    ``use_cache=True`` (training turns it off, generation wants it).
    """
    module = unwrap_model(engine)
    if engine.zero_optimization_partition_weights():
        if not engine.zero_gather_16bit_weights_on_model_save():
            raise ValueError("export needs zero_optimization.stage3_gather_16bit_weights_on_model_save: true in "
                             "the DeepSpeed config (DeepSpeed consolidates ZeRO-3 weights only then)")
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # all ranks gather; rank 0 gets the dict
    else:
        state_dict = engine.module_state_dict()
    if dist.get_rank() == 0:
        use_cache = module.config.use_cache
        module.config.use_cache = True
        try:
            module.save_pretrained(out_dir, state_dict=state_dict, max_shard_size=max_shard_size)
        finally:
            module.config.use_cache = use_cache
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    dist.barrier()
