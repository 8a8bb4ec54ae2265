"""Naive references. Every equivalence test compares against these, never against the code under test."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def dense_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """q: [L, Hq, D], k/v: [L, Hkv, D] -> [L, Hq, D], plain softmax attention with a causal mask."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device).tril()
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("hqk,khd->qhd", p, v)


def repeated_prefix_attention(q, k, v, prefix_lens, suffix_lens, scale=None):
    """The standard forward: every member as its own `[prefix ; suffix]`, prefix repeated G times.

    q, k, v are packed `[prefix_g | suffix_g1 | ...]` group by group; returns the packed output
    where a prefix row is taken from the group's first member (every member gives the same rows).
    """
    out = torch.empty_like(q)
    at = 0
    for p, members in zip(prefix_lens, suffix_lens):
        pre = slice(at, at + p)
        at += p
        for i, s in enumerate(members):
            suf = slice(at, at + s)
            at += s
            o = dense_causal_attention(
                torch.cat([q[pre], q[suf]]), torch.cat([k[pre], k[suf]]), torch.cat([v[pre], v[suf]]), scale
            )
            if i == 0:
                out[pre] = o[:p]
            out[suf] = o[p:]
    return out


def padded_completion_logprobs(
    model, prompt_ids, prompt_mask, completion_ids, completion_mask, group_size, temperature=1.0
):
    """The standard batch through an unpatched causal LM: each prompt repeated G times beside its completion.

    prompt_*: [B, Lp] (any padding), completion_*: [N, Lc] right-padded; returns (logps, entropies),
    both [N, Lc] float32 and 0 at masked places. Full [N, L, V] logits, TRL's temperature, softcap
    and logit scale (`logit_scale` / `logits_scaling` only), positions counted over real tokens.
    """
    sizes = [group_size] * prompt_ids.shape[0] if isinstance(group_size, int) else list(group_size)
    repeats = torch.tensor(sizes)
    ids = torch.cat([prompt_ids.repeat_interleave(repeats, 0), completion_ids], 1)
    mask = torch.cat([prompt_mask.repeat_interleave(repeats, 0), completion_mask], 1)
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.float()
    config = model.config
    if getattr(config, "logit_scale", None) is not None:
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None) is not None:
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    logits = logits / temperature
    Lc = completion_ids.shape[1]
    logits = logits[:, -Lc - 1 : -1]
    logp_all = torch.log_softmax(logits, -1)
    logps = logp_all.gather(-1, completion_ids[..., None]).squeeze(-1)
    entropies = -(logp_all.exp() * logp_all).sum(-1)
    keep = completion_mask.bool()
    return logps.masked_fill(~keep, 0.0), entropies.masked_fill(~keep, 0.0)


def member_hidden_states(model, prompt_ids_per_group, completion_ids_per_member, group_size):
    """Last hidden states of each `[prompt ; completion]` forwarded alone through an unpatched decoder.

    Returns a list over members of [P_g + S_n, H] tensors.
    """
    sizes = [group_size] * len(prompt_ids_per_group) if isinstance(group_size, int) else list(group_size)
    out, n = [], 0
    for prompt, size in zip(prompt_ids_per_group, sizes):
        for _ in range(size):
            ids = torch.cat([prompt, completion_ids_per_member[n]])[None]
            out.append(model(input_ids=ids).last_hidden_state[0])
            n += 1
    return out
