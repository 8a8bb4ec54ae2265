"""Patch a Hugging Face decoder so that a forward given `prefix_layout=` runs prefix-grouped.

`patch_model` registers the attention implementation ``"prefix_grouper"`` (attention function
and mask function) and switches the model to it. Per call:

| forward kwargs              | masks                               | attention                           |
|-----------------------------|-------------------------------------|-------------------------------------|
| no `prefix_layout`          | the original implementation's       | the original implementation         |
| `prefix_layout=layout`      | none built (no [T, T] tensor)       | `prefix_grouper_attention` over     |
|                             |                                     | the packed `[1, T]` batch           |

A packed call looks like ``model.model(input_ids=ids[None], position_ids=layout.position_ids[None],
prefix_layout=layout)`` with ``ids = layout.pack(prompt_ids, completion_ids)`` (position ids are
filled from the layout when omitted). RoPE then places every suffix right after its prompt.

transformers builds masks from the implementation name alone, before any attention call, so a
forward pre-hook on every patched `PreTrainedModel` checks the call and records it (layout or
not) in a context variable that the registered mask function reads.

Windows: a sliding or chunked window shorter than `max_length` is refused at patch time; a longer
one is accepted and every packed call checks that no prompt + completion exceeds it.

The original implementation's name and the chosen backend live on every submodule as
`_prefix_grouper` (so deep copies stay patched) and never in the config (so saving is unchanged).
"""
from __future__ import annotations

import contextvars
import inspect
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import BACKENDS, prefix_grouper_attention
from .compat import CACHE_NAMES
from .layout import PrefixGroupLayout

ATTN_NAME = "prefix_grouper"
WINDOWED_LAYERS = {"sliding_attention": "sliding_window", "chunked_attention": "attention_chunk_size"}


@dataclass(frozen=True)
class PatchState:
    """What a patched model remembers: its original attention, the grouped backend, its window."""

    original: str
    backend: str
    window: int | None  # smallest sliding/chunked window of any layer; None when every layer is full


@dataclass(frozen=True)
class _Call:
    layout: PrefixGroupLayout | None
    state: PatchState


# the forward in progress (set by the patched models' pre-hooks), read by the mask function
_CURRENT: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("prefix_grouper_call", default=None)
# config identity -> state, for masks built outside a forward (e.g. `generate` with a static cache)
_BY_CONFIG: dict[int, tuple[weakref.ref, PatchState]] = {}


def unwrap_model(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside a DeepSpeed engine (or the model itself)."""
    inner = model
    while not isinstance(inner, PreTrainedModel) and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel or a DeepSpeed engine around one, got {type(model)}")
    return inner


# ---------------------------------------------------------------------------------------------- refusals
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


def unsupported_reasons(model: PreTrainedModel, max_length: int | None) -> list[str]:
    """Why `model` cannot be served exactly for sequences up to `max_length` tokens (empty when it can)."""
    config = model.config
    text = config.get_text_config()
    reasons = []
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


# ---------------------------------------------------------------------------------------------- attention
def _original_attention(module: nn.Module, name: str) -> Callable:
    if name == "eager":
        # "eager" is each modeling file's own function, as in the modeling code itself
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__}'s module defines no eager_attention_forward to fall back on")
        return fn
    return ALL_ATTENTION_FUNCTIONS[name]


def _state_of(module: nn.Module) -> PatchState:
    state = getattr(module, "_prefix_grouper", None)
    if state is None:
        raise RuntimeError(
            f"{type(module).__name__} uses attn_implementation={ATTN_NAME!r} but was not patched; "
            "call patch_model(model)"
        )
    return state


def prefix_grouper_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    prefix_layout: PrefixGroupLayout | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The registered attention function. query: [1, Hq, T, D]; key, value: [1, Hkv, T, D] -> ([1, T, Hq, D], None).

    Without `prefix_layout` it is exactly the model's original implementation.
    """
    state = _state_of(module)
    if prefix_layout is None:
        return _original_attention(module, state.original)(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"a prefix_layout forward takes one packed row, got a batch of {query.shape[0]}")
    if kwargs.get("dropout", 0.0):
        raise ValueError(f"attention dropout ({kwargs['dropout']}) is not supported with a prefix_layout")
    if kwargs.get("softcap") is not None:
        raise ValueError("attention-logit softcapping is not supported with a prefix_layout")
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise ValueError(f"{type(module).__name__} is not causal; a prefix_layout needs causal attention")
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))
    out = prefix_grouper_attention(q, k, v, prefix_layout, softmax_scale=kwargs.get("scaling"), backend=state.backend)
    return out.unsqueeze(0), None


def prefix_grouper_mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    """The registered mask function: no mask under a layout, else the original implementation's mask."""
    call = _CURRENT.get()
    state = call.state if call is not None else _state_of_config(config)
    if call is not None and call.layout is not None:
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS[state.original](*args, config=config, **kwargs)


def _state_of_config(config: Any) -> PatchState:
    entry = _BY_CONFIG.get(id(config))
    if entry is None or entry[0]() is not config:
        raise RuntimeError(f"a mask was requested for attn_implementation={ATTN_NAME!r} on an unpatched model copy; "
                           "call patch_model on it")
    return entry[1]


def _remember_config(config: Any, state: PatchState) -> None:
    key = id(config)
    _BY_CONFIG[key] = (weakref.ref(config, lambda _ref: _BY_CONFIG.pop(key, None)), state)


# ---------------------------------------------------------------------------------------------- forward hooks
def _check_packed_call(module: nn.Module, arguments: dict[str, Any], layout: PrefixGroupLayout) -> None:
    if not isinstance(layout, PrefixGroupLayout):
        raise TypeError(f"prefix_layout must be a PrefixGroupLayout, got {type(layout)}")
    x = arguments.get("input_ids")
    x = arguments.get("inputs_embeds") if x is None else x
    if x is None or x.dim() < 2 or x.shape[0] != 1 or x.shape[1] != layout.num_tokens:
        shape = None if x is None else tuple(x.shape)
        raise ValueError(
            f"a prefix_layout forward needs input_ids [1, {layout.num_tokens}] (or inputs_embeds), got {shape}"
        )
    if x.device != layout.device:
        raise ValueError(f"inputs are on {x.device} but the layout is on {layout.device}; use layout.to(device)")
    if arguments.get("attention_mask") is not None:
        raise ValueError("pass attention_mask=None with a prefix_layout: the layout defines the attention")
    for name in CACHE_NAMES:
        if arguments.get(name) is not None:
            raise ValueError(f"{name} cannot be combined with a prefix_layout")
    window = _state_of(module).window
    if window is not None:
        longest = int((layout.prefix_lens[layout.member_group] + layout.suffix_lens).max())
        if longest > window:
            raise ValueError(
                f"a prompt + completion of {longest} tokens exceeds the model's attention window ({window})"
            )


def _enter(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of every patched PreTrainedModel: check a packed call, record it for the masks."""
    layout = kwargs.get("prefix_layout")
    if layout is not None:
        signature = inspect.signature(module.forward)
        arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        _check_packed_call(module, arguments, layout)
        if arguments.get("use_cache"):
            raise ValueError("use_cache=True cannot be combined with a prefix_layout")
        if "position_ids" in signature.parameters and arguments.get("position_ids") is None:
            if "position_ids" in arguments and "position_ids" not in kwargs:
                raise ValueError("pass position_ids by keyword with a prefix_layout")
            kwargs = {**kwargs, "position_ids": layout.position_ids[None]}
        if "use_cache" in signature.parameters:
            kwargs = {**kwargs, "use_cache": False}
    module._prefix_grouper_tokens.append(_CURRENT.set(_Call(layout, _state_of(module))))
    return args, kwargs


def _leave(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """Forward hook (also on error): forget the call `_enter` recorded."""
    if module._prefix_grouper_tokens:
        _CURRENT.reset(module._prefix_grouper_tokens.pop())


# ---------------------------------------------------------------------------------------------- public
def patch_model(model: nn.Module, *, backend: str = "auto", max_length: int | None = None) -> nn.Module:
    """Make `model` (a transformers causal LM, or a DeepSpeed engine around one) prefix-group on request.

    backend: the `prefix_grouper_attention` backend ("auto", "flash_attn", "torch", "cpu").
    max_length: the longest prompt + completion you will pass; sliding or chunked windows at least
        this long are accepted (and checked again on every packed call). Default: the config's
        `max_position_embeddings`.
    Returns `model`. Raises ValueError naming every reason when the model cannot be served exactly.
    Calling it again is harmless (it updates `backend` / `max_length`).
    """
    hf = unwrap_model(model)
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {['auto', *BACKENDS]}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    text = hf.config.get_text_config()
    reasons = unsupported_reasons(hf, max_length or getattr(text, "max_position_embeddings", None))
    if reasons:
        raise ValueError(f"cannot prefix-group {type(hf).__name__}: " + "; ".join(reasons))

    current = hf.config._attn_implementation
    original = hf._prefix_grouper.original if current == ATTN_NAME else current
    windows = _windows(text)
    state = PatchState(original=original, backend=backend, window=min(windows.values()) if windows else None)

    AttentionInterface.register(ATTN_NAME, prefix_grouper_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, prefix_grouper_mask)
    for module in hf.modules():
        module._prefix_grouper = state
        if isinstance(module, PreTrainedModel) and not hasattr(module, "_prefix_grouper_tokens"):
            module._prefix_grouper_tokens = []
            module.register_forward_pre_hook(_enter, with_kwargs=True)
            module.register_forward_hook(_leave, with_kwargs=True, always_call=True)
    if hf.config._attn_implementation != ATTN_NAME:
        hf.set_attn_implementation(ATTN_NAME)
    _remember_config(hf.config, state)
    return model
