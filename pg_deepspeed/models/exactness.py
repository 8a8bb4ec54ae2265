"""Which models prefix grouping serves exactly: refusals at patch time, limits checked on every packed call.

A packed call puts many sequences in one row `[1, T]` and gives each token its own position id. That is
exact when everything the model computes from positions reads `position_ids`, and attention is plain
causal softmax attention (optionally with the extras `patch.ATTENTION_KWARGS` implements). It is refused:
- at patch time, when no call could be exact (encoder-decoders, bidirectional or hybrid/linear layers,
  attention-logit softcapping, a window shorter than the longest sequence the caller will pass, or
  position handling that reads the packed index and cannot be bounded);
- per call, when one call could not be exact: a member longer than the smallest window, or a packed row
  longer than a model that reads the packed index is exact for (`CallLimits`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from transformers import PreTrainedModel

from pg_deepspeed.layouts.group import PrefixGroupLayout

WINDOWED_LAYERS = {"sliding_attention": "sliding_window", "chunked_attention": "attention_chunk_size"}


@dataclass(frozen=True)
class CallLimits:
    """What one packed call may hold and stay exact."""

    window: int | None = None  # longest prompt + completion: the smallest sliding/chunked window of any layer
    packed_tokens: int | None = None  # most tokens in the packed row, for models that read the packed index
    packed_reason: str = ""

    def check(self, layout: PrefixGroupLayout) -> None:
        """Raise ValueError naming the limit when `layout` exceeds one."""
        if self.window is not None:
            longest = layout.longest_path
            if longest > self.window:
                raise ValueError(
                    f"a prompt + completion of {longest} tokens exceeds the model's attention window ({self.window})"
                )
        if self.packed_tokens is not None and layout.num_tokens > self.packed_tokens:
            raise ValueError(
                f"the packed row holds {layout.num_tokens} tokens, more than the {self.packed_tokens} this model is "
                f"exact for: {self.packed_reason}; pack fewer groups per call"
            )


def _windows(config: Any) -> dict[str, int]:
    """{kind of window: smallest size} over the layers that use one."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        kinds = {WINDOWED_LAYERS[t] for t in types if t in WINDOWED_LAYERS}
    else:
        kinds = {k for k in ("sliding_window", "attention_chunk_size") if getattr(config, k, None) is not None}
        if getattr(config, "use_sliding_window", True) is False:
            kinds.discard("sliding_window")
    return {k: int(getattr(config, k)) for k in kinds if getattr(config, k, None) is not None}


# ------------------------------------------------------------------------- models that read the packed index
def _llama4_packed_limit(config: Any) -> tuple[int, str] | None:
    """Llama 4 scales NoPE-layer queries by 1 + attn_scale·log1p(floor((i + 1) / floor_scale)) with i the index in
    the row (`torch.arange`), not the position. Every index below floor_scale - 1 gives scale 1, as does every
    position (positions never exceed indices in a packed row), so a row shorter than floor_scale is exact."""
    nope_layers = [i for i, rope in enumerate(getattr(config, "no_rope_layers", None) or []) if not rope]
    if not getattr(config, "attn_temperature_tuning", False) or not nope_layers:
        return None
    return int(config.floor_scale) - 1, (
        f"Llama 4 scales the queries of its NoPE layers by the index in the row, not the position "
        f"(attn_temperature_tuning, floor_scale={config.floor_scale})"
    )


PACKED_INDEX_LIMITS: dict[str, Callable[[Any], tuple[int, str] | None]] = {
    "llama4_text": _llama4_packed_limit,
}


# Families refused whatever the call: what they compute reads the packed row, not `position_ids`, or carries maths in
# an argument or mask that prefix-grouped attention does not implement (a survey of transformers 5.24's modeling
# files; some are also refused by the checks in `unsupported_reasons`, named here so the reason is the true one).
_ARANGE_POSITIONS = "builds its position embeddings from the index in the row (torch.arange), ignoring position_ids"
_SPARSE_INDEXER = "selects each query's keys with a learned top-k indexer over the row (`indices` / its own mask)"
_ROBERTA_POSITIONS = "numbers positions from padding_idx + 1, so the layout's positions (from 0) are not its own"
PACKED_INDEX_REFUSED: dict[str, str] = {
    "doge": "adds a learned per-key bias and keeps the top keep_window_size keys of the whole row through its own "
            "attention mask",
    "blt": "builds patches, hashed n-gram embeddings and positions from the packed row",
    "qwen4_exp_text": "builds n-gram embeddings from the packed token history",
    "deepseek_v4": "compresses K/V over windows of consecutive packed tokens",
    "minimax_m3_vl_text": "compares key indices in the row (torch.arange) with position_ids in its block indexer",
    "inkling_text": "adds a relative-position bias built from distances in the row (torch.arange)",
    "inkling2_text": "adds a relative-position bias built from distances in the row (torch.arange)",
    "inkling2_loop_text": "adds a relative-position bias built from distances in the row (torch.arange)",
    **{name: _SPARSE_INDEXER for name in ("deepseek_v32", "glm_moe_dsa", "axk2", "dots3_note_text", "hy_v4")},
    **{name: _ARANGE_POSITIONS for name in ("bart", "mbart", "blenderbot", "blenderbot-small", "marian", "pegasus",
                                            "plbart", "bigbird_pegasus", "musicgen_decoder",
                                            "musicgen_melody_decoder")},
    **{name: _ROBERTA_POSITIONS for name in ("roberta", "camembert", "xlm-roberta", "xlm-roberta-xl", "data2vec-text",
                                             "xmod", "roberta-prelayernorm")},
}


def call_limits(config: Any) -> CallLimits:
    """The per-call limits of a model whose text config is `config`."""
    windows = _windows(config)
    packed = PACKED_INDEX_LIMITS.get(getattr(config, "model_type", ""), lambda _c: None)(config)
    return CallLimits(
        window=min(windows.values()) if windows else None,
        packed_tokens=packed[0] if packed else None,
        packed_reason=packed[1] if packed else "",
    )


# ------------------------------------------------------------------------------------------- patch time
def unsupported_reasons(model: PreTrainedModel, max_length: int | None) -> list[str]:
    """Why `model` cannot be served exactly for sequences up to `max_length` tokens (empty when it can)."""
    config = model.config
    text = config.get_text_config()
    reasons = []
    for kind in dict.fromkeys((getattr(config, "model_type", ""), getattr(text, "model_type", ""))):
        if kind in PACKED_INDEX_REFUSED:
            reasons.append(f"{kind} {PACKED_INDEX_REFUSED[kind]}")
    if getattr(config, "is_encoder_decoder", False):
        reasons.append("encoder-decoder models are not supported (only decoder-only causal LMs are)")
    if not getattr(model, "_supports_attention_backend", False) or not model._can_set_attn_implementation():
        reasons.append(f"{type(model).__name__} does not route its attention through transformers' AttentionInterface")
    if not getattr(text, "is_causal", True):
        reasons.append("the model attends bidirectionally (config.is_causal is False)")
    if getattr(text, "attn_logit_softcapping", None) is not None:
        reasons.append(f"attention-logit softcapping (attn_logit_softcapping={text.attn_logit_softcapping})")
    types = getattr(text, "layer_types", None) or []
    other = sorted({t for t in types if t != "full_attention" and t not in WINDOWED_LAYERS})
    block_types = sorted({t for t in (getattr(text, "layers_block_type", None) or []) if t != "attention"})
    if other or block_types:
        reasons.append(f"linear-attention or hybrid layers ({', '.join(other + block_types)})")
    for kind, size in _windows(text).items():
        if max_length is None or size < max_length:
            reasons.append(
                f"{kind}={size} would cut into sequences of up to max_length={max_length} tokens "
                f"(pass patch_model(..., max_length=<= {size}) if your prompt + completion never exceed it)"
            )
    return reasons
