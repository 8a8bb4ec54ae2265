"""Named tiny model configs for demos and tests: random-initialised, nothing downloaded.

Both presets use the character tokenizer's vocabulary (:mod:`pg_deepspeed.demo.char_tokenizer`) and grouped-query
attention, so they exercise the same code paths as real Qwen2 / Llama checkpoints at a size two CPU cores train.

| preset       | layers | hidden | heads (q/kv) | mlp | max positions |
|--------------|--------|--------|--------------|-----|---------------|
| `tiny-qwen2` | 4      | 128    | 4 / 2        | 256 | 4096          |
| `tiny-llama` | 4      | 128    | 4 / 2        | 256 | 4096          |
"""
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from pg_deepspeed.demo.char_tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_cache": False,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-qwen2": {"model_type": "qwen2", **_COMMON, "rope_theta": 10000.0},
    "tiny-llama": {"model_type": "llama", **_COMMON, "rope_theta": 10000.0},
}


def is_preset(name: str) -> bool:
    """Whether ``name`` is one of :data:`PRESETS` (as opposed to a model directory)."""
    return name in PRESETS


def preset_config(name: str) -> PretrainedConfig:
    """A fresh transformers config for the preset ``name``; raises ValueError for an unknown name."""
    if not is_preset(name):
        raise ValueError(f"unknown model preset {name!r}; presets are {sorted(PRESETS)}")
    fields = dict(PRESETS[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)
