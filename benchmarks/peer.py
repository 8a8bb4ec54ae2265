"""The peer: the published `prefix-grouper` package (PyPI), run as its README intends.

The package splits each grouped row into a prefix batch and a suffix batch, copies the prefix
K/V once per member, and calls a user attention function twice. Its causal rule is implicit:
FlashAttention-2's bottom-right alignment (query i sees key j when j <= i + Lk - Lq). On CUDA
with flash-attn installed it gets flash_attention_2; elsewhere it gets `masked_sdpa` below,
which builds that rule explicitly together with the key-padding mask.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

PEER_ATTENTION = "prefix_grouper_bench"
HeadLogprobs = Callable[[Tensor, Tensor], Tensor]  # hidden [R, h], targets [R] -> log p(target) [R]


def masked_sdpa(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, *, scaling: float | None = None) -> Tensor:
    """q: [b, Hq, Lq, D], k/v: [b, Hkv, Lk, D], key_mask: [b, Lk] bool -> [b, Lq, Hq, D].

    Bottom-right causal AND key padding. Rows with no visible key (padding queries) are let see
    every key, so they stay finite; the package discards those rows.
    """
    Lq, Lk = q.shape[2], k.shape[2]
    rows = torch.arange(Lq, device=q.device)[:, None]
    cols = torch.arange(Lk, device=q.device)[None, :]
    mask = (cols <= rows + (Lk - Lq))[None, None] & key_mask.bool()[:, None, None, :]
    mask = mask | ~mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2)


def _peer_attention(module, query, key, value, attention_mask, *, prefix_grouper, scaling=None, **kwargs):
    """transformers AttentionInterface entry: hands q/k/v to the package with `masked_sdpa`."""
    return prefix_grouper.forward(masked_sdpa, query, key, value, scaling=scaling), None


def attach_peer(model: torch.nn.Module) -> dict:
    """Point `model` at the peer's attention; returns the extra kwargs its forward needs.

    CUDA with flash-attn: the package's own hook over flash_attention_2.
    Otherwise: the package driving `masked_sdpa`.
    """
    from transformers import AttentionInterface

    device = next(model.parameters()).device
    if device.type == "cuda" and _has_flash_attn():
        from prefix_grouper.utils.register_transformers import register_attention

        register_attention()
        model.set_attn_implementation("prefix_grouper_attention")
        return {"prefix_grouper_attn_func": "flash_attention_2"}
    AttentionInterface.register(PEER_ATTENTION, _peer_attention)
    model.set_attn_implementation(PEER_ATTENTION)
    return {}


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def default_head_logprobs(model: torch.nn.Module) -> HeadLogprobs:
    """hidden [R, h], targets [R] -> log p(target) [R] through the model's LM head, in fp32."""

    def head(hidden: Tensor, targets: Tensor) -> Tensor:
        logits = model.get_output_embeddings()(hidden).float()
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)

    return head


def peer_completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    group_size: int | list[int],
    *,
    head_logprobs: HeadLogprobs,
    forward_kwargs: dict | None = None,
) -> Tensor:
    """Completion log-probs [N, Lc] (0 at padding) through the peer, as its README shows.

    The LM head runs on completion positions only, through `head_logprobs`.

    prompt_ids/mask: [B, Lp] one row per group; completion_ids/mask: [N, Lc] right-padded,
    G_g consecutive rows per group (`group_size`: one G, or a list of B). `model` must have been through `attach_peer`.
    """
    from prefix_grouper import PrefixGrouper

    pm, cm = prompt_mask.bool(), completion_mask.bool()
    grouper = PrefixGrouper.from_ungrouped_masks(pm, cm, group_size, device=prompt_ids.device, padding_mode="right")
    input_ids = grouper.concat_input(prompt_ids, pm, completion_ids, cm)
    prefix_pos = pm.long().cumsum(1) - 1
    prompt_len = pm.sum(1).repeat_interleave(torch.as_tensor(group_size, device=pm.device))
    suffix_pos = prompt_len[:, None] + cm.long().cumsum(1) - 1
    position_ids = grouper.concat_input(prefix_pos, pm, suffix_pos, cm)
    hidden = model.model(
        input_ids=input_ids, position_ids=position_ids, prefix_grouper=grouper, **(forward_kwargs or {})
    ).last_hidden_state
    _, _, suffix_hidden, _ = grouper.split_output(hidden, include_prefix_last=1)
    hidden = suffix_hidden[:, :-1]  # [N, max S, h]: row c predicts completion token c
    valid = cm[:, : hidden.shape[1]]
    logps = head_logprobs(hidden[valid], completion_ids[:, : hidden.shape[1]][valid])
    return logps.new_zeros(cm.shape).index_put(valid.nonzero(as_tuple=True), logps)
