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

What can be served exactly is decided in `exactness.py`: refusals at patch time (a sliding or chunked
window shorter than `max_length`, among others) and limits every packed call is checked against (no
prompt + completion longer than a window; no packed row longer than a model that reads the packed
index is exact for).

The patch's state (the original implementation's name, the backend, the call limits and, once
`parallelize_sequence` applied it, the sequence parallelism) lives on every submodule as `_prefix_grouper`, and
never in the config (so saving is unchanged): an attention function receives only its module, also when activation
checkpointing recomputes a layer in backward, outside any model forward; and deep copies stay patched.
A patched model gets its own copy of its config tree first: transformers' `from_config` hands one config
object to every model built from it, and switching the implementation writes into that object, so
without the copy a reference or baseline built from the same config would switch too.
"""
from __future__ import annotations

import contextvars
import copy
import inspect
import sys
import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pg_deepspeed.attention import check_backend_name, prefix_grouper_attention
from pg_deepspeed.models.transformers_compat import CACHE_NAMES
from pg_deepspeed.layouts.group import PrefixGroupLayout
from pg_deepspeed.models.sequence_shards import SequenceParallel, SequenceShard
from pg_deepspeed.layouts.tree import PrefixTreeLayout
from pg_deepspeed.models.exactness import CallLimits, call_limits, unsupported_reasons

ATTN_NAME = "prefix_grouper"
# Keyword arguments an attention module may hand the attention function, and what becomes of them under a layout:
# implemented (scaling, s_aux = attention sinks), refused when they would change the result (dropout, softcap,
# is_causal=False; sliding_window is checked against the layout by the forward pre-hook), or without effect on
# the attention maths (positions are already in q and k; the rest steer outputs or caches). Any other argument
# with a value is refused: dropping it could change the result silently.
ATTENTION_KWARGS = frozenset({
    "scaling", "s_aux", "dropout", "softcap", "is_causal", "sliding_window",
    "position_ids", "cache_position", "use_cache", "output_attentions", "output_hidden_states",
    "output_router_logits", "return_dict",
})


@dataclass(frozen=True)
class PatchState:
    """What a patched model remembers: its original attention, the grouped backend, its per-call limits, and the
    sequence parallelism whose attention runs its packed calls (None: `grouped_attention_forward` on each rank)."""

    original: str
    backend: str
    limits: CallLimits
    sequence_parallel: SequenceParallel | None = None


@dataclass(frozen=True)
class _Call:
    layout: PrefixGroupLayout | PrefixTreeLayout | None
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


def _original_of_unpatched(module: nn.Module) -> str:
    """The original implementation of a module that was not patched but whose config names ours.

    That happens to a model built from a patched model's config (a reference, a baseline): it keeps
    its original attention, recorded with the config when the other model was patched.
    """
    config = getattr(module, "config", None)
    if config is None:
        _state_of(module)  # raises "was not patched"
    return _state_of_config(config).original


def prefix_grouper_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    prefix_layout: PrefixGroupLayout | PrefixTreeLayout | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The registered attention function. query: [1, Hq, T, D]; key, value: [1, Hkv, T, D] -> ([1, T, Hq, D], None).

    Without `prefix_layout` it is exactly the model's original implementation, unless a decode step passes
    `shared_prefix=` (a `SharedPrefixCache`), whose attention merges each group's prompt held once. With it, the
    packed call runs :func:`grouped_attention_forward`, or the sequence parallelism's attention when
    `parallelize_sequence` gave the model one (a `sequence_shard=` in kwargs is for that one to read).
    """
    shared_prefix = kwargs.pop("shared_prefix", None)
    if shared_prefix is not None:
        return shared_prefix.attend(module, query, key, value, attention_mask, **kwargs)
    if prefix_layout is None:
        state = getattr(module, "_prefix_grouper", None)
        original = state.original if state is not None else _original_of_unpatched(module)
        return _original_attention(module, original)(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None:  # our mask function builds none under a layout: this one is the module's own
        raise ValueError(f"{type(module).__name__} builds its own attention mask, which a prefix_layout cannot honour")
    sp = _state_of(module).sequence_parallel
    attend = grouped_attention_forward if sp is None else sp.attention
    return attend(module, query, key, value, prefix_layout, **kwargs)


def grouped_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    prefix_layout: PrefixGroupLayout | PrefixTreeLayout,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Prefix-grouped attention over the whole packed row. query: [1, Hq, T, D] -> ([1, T, Hq, D], None)."""
    state = _state_of(module)
    if kwargs.get("sequence_shard") is not None:
        raise ValueError("a sequence_shard needs the model's sequence parallelism "
                         "(pg_deepspeed.distributed.sequence_parallel.parallelize_sequence)")
    if query.shape[0] != 1:
        raise ValueError(f"a prefix_layout forward takes one packed row, got a batch of {query.shape[0]}")
    if query.shape[2] != prefix_layout.num_tokens:
        raise ValueError(f"the attention got {query.shape[2]} tokens but the layout has {prefix_layout.num_tokens}")
    if kwargs.get("dropout", 0.0):
        raise ValueError(f"attention dropout ({kwargs['dropout']}) is not supported with a prefix_layout")
    if kwargs.get("softcap") is not None:
        raise ValueError("attention-logit softcapping is not supported with a prefix_layout")
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise ValueError(f"{type(module).__name__} is not causal; a prefix_layout needs causal attention")
    unknown = sorted(k for k, v in kwargs.items() if k not in ATTENTION_KWARGS and v is not None)
    if unknown:
        raise ValueError(
            f"{type(module).__name__} passes attention arguments {unknown} that prefix-grouped attention does not "
            "implement; refusing rather than dropping them"
        )
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))
    if torch.is_autocast_enabled(q.device.type):  # as SDPA does under autocast: q, k, v in the autocast dtype
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = prefix_grouper_attention(q, k, v, prefix_layout, softmax_scale=kwargs.get("scaling"), backend=state.backend,
                                   sinks=kwargs.get("s_aux"))
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
def _check_packed_call(module: nn.Module, arguments: dict[str, Any], layout: PrefixGroupLayout | PrefixTreeLayout,
                       shard: SequenceShard | None) -> None:
    if not isinstance(layout, (PrefixGroupLayout, PrefixTreeLayout)):
        raise TypeError(f"prefix_layout must be a PrefixGroupLayout or PrefixTreeLayout, got {type(layout)}")
    if shard is not None:
        if not isinstance(shard, SequenceShard):
            raise TypeError(f"sequence_shard must be a SequenceShard, got {type(shard)}")
        if shard.total != layout.num_tokens:
            raise ValueError(f"sequence_shard splits {shard.total} tokens but the layout has {layout.num_tokens}")
    tokens = layout.num_tokens if shard is None else shard.length
    x = arguments.get("input_ids")
    x = arguments.get("inputs_embeds") if x is None else x
    if x is None or x.dim() < 2 or x.shape[0] != 1 or x.shape[1] != tokens:
        shape = None if x is None else tuple(x.shape)
        what = "" if shard is None else f" (rank {shard.rank}'s share of {shard.size})"
        raise ValueError(
            f"a prefix_layout forward needs input_ids [1, {tokens}]{what} (or inputs_embeds), got {shape}"
        )
    if x.device != layout.device:
        raise ValueError(f"inputs are on {x.device} but the layout is on {layout.device}; use layout.to(device)")
    if arguments.get("attention_mask") is not None:
        raise ValueError("pass attention_mask=None with a prefix_layout: the layout defines the attention")
    for name in CACHE_NAMES:
        if arguments.get(name) is not None:
            raise ValueError(f"{name} cannot be combined with a prefix_layout")
    _state_of(module).limits.check(layout)


def _enter(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of every patched PreTrainedModel: check a packed call, record it for the masks."""
    layout = kwargs.get("prefix_layout")
    if layout is not None:
        signature = inspect.signature(module.forward)
        arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        shard = kwargs.get("sequence_shard")
        _check_packed_call(module, arguments, layout, shard)
        if arguments.get("use_cache"):
            raise ValueError("use_cache=True cannot be combined with a prefix_layout")
        if "position_ids" in signature.parameters and arguments.get("position_ids") is None:
            if "position_ids" in arguments and "position_ids" not in kwargs:
                raise ValueError("pass position_ids by keyword with a prefix_layout")
            positions = layout.position_ids if shard is None else layout.position_ids[shard.start:shard.stop]
            kwargs = {**kwargs, "position_ids": positions[None]}
        if "use_cache" in signature.parameters:
            kwargs = {**kwargs, "use_cache": False}
    module._prefix_grouper_tokens.append(_CURRENT.set(_Call(layout, _state_of(module))))
    return args, kwargs


def _leave(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """Forward hook (also on error): forget the call `_enter` recorded."""
    if module._prefix_grouper_tokens:
        _CURRENT.reset(module._prefix_grouper_tokens.pop())


def _give_private_config(model: PreTrainedModel) -> None:
    """Point `model` and every submodule at a deep copy of the config tree they share with other models.

    Modules hold the config object (or one of its sub-configs, e.g. `text_config`) as `.config`; each
    reference into the old tree is moved to the matching object of the copy.
    """
    old = model.config
    new = copy.deepcopy(old)
    twins, pending = {id(old): new}, [(old, new)]
    while pending:
        a, b = pending.pop()
        for key in getattr(a, "sub_configs", {}) or {}:
            sub_a, sub_b = getattr(a, key, None), getattr(b, key, None)
            if sub_a is not None and sub_b is not None and id(sub_a) not in twins:
                twins[id(sub_a)] = sub_b
                pending.append((sub_a, sub_b))
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) in twins:
            module.config = twins[id(config)]


def _set_state(hf: PreTrainedModel, state: PatchState) -> None:
    for module in hf.modules():
        module._prefix_grouper = state


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
    check_backend_name(backend)
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    text = hf.config.get_text_config()
    reasons = unsupported_reasons(hf, max_length or getattr(text, "max_position_embeddings", None))
    if reasons:
        raise ValueError(f"cannot prefix-group {type(hf).__name__}: " + "; ".join(reasons))

    patched: PatchState | None = getattr(hf, "_prefix_grouper", None)
    current = hf.config._attn_implementation
    if current != ATTN_NAME:
        original = current
    else:  # patched before, or built from a patched model's config
        original = patched.original if patched is not None else _state_of_config(hf.config).original
    if patched is None:
        _give_private_config(hf)
    state = PatchState(original=original, backend=backend, limits=call_limits(text),
                       sequence_parallel=patched.sequence_parallel if patched is not None else None)

    AttentionInterface.register(ATTN_NAME, prefix_grouper_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, prefix_grouper_mask)
    _set_state(hf, state)
    for module in hf.modules():
        if isinstance(module, PreTrainedModel) and not hasattr(module, "_prefix_grouper_tokens"):
            module._prefix_grouper_tokens = []
            module.register_forward_pre_hook(_enter, with_kwargs=True)
            module.register_forward_hook(_leave, with_kwargs=True, always_call=True)
    if hf.config._attn_implementation != ATTN_NAME:
        hf.set_attn_implementation(ATTN_NAME)
    _remember_config(hf.config, state)
    return model


def sequence_parallel_of(model: nn.Module) -> SequenceParallel | None:
    """The sequence parallelism a patched model's packed calls run under (None: each rank forwards the whole row)."""
    state = getattr(unwrap_model(model), "_prefix_grouper", None)
    return None if state is None else state.sequence_parallel


def set_sequence_parallel(model: nn.Module, sp: SequenceParallel | None) -> None:
    """Run a patched model's packed calls under `sp` (its `attention` instead of `grouped_attention_forward`);
    the distributed layer's `parallelize_sequence` calls it."""
    hf = unwrap_model(model)
    state = getattr(hf, "_prefix_grouper", None)
    if state is None:
        raise ValueError(f"{type(hf).__name__} is not patched; call pg_deepspeed.patch_model(model) first")
    _set_state(hf, replace(state, sequence_parallel=sp))
