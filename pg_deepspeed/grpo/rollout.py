"""Sampling G completions per prompt with a prefix-once prefill.

Each prompt is prefilled once; its KV cache is then repeated to its G samples
(`cache.batch_repeat_interleave(G)`), so the prompt's prefill costs 1/G of the naive one. Decoding
runs token by token with the model's own (unpatched) attention.

Under ZeRO-3 every forward gathers each layer's parameters with a collective, so all ranks must run
the same number of forwards: the loop stops only when every rank is done (an all-reduce per token).
Memory: the decode cache holds B·G copies of the prompt's K/V — the trade-off for one prefill; lower
`--prompts_per_device` where that is too much.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..compat import CACHE_KWARG, returned_cache
from .collective import any_rank


@dataclass
class Rollout:
    completion_ids: Tensor   # [N, Lc], right-padded with pad_id
    completion_mask: Tensor  # [N, Lc], 1 on generated tokens (EOS included)


def sample_tokens(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> Tensor:
    """logits: [N, V] -> token ids [N], with temperature and nucleus (top-p) filtering."""
    logits = logits.float() / max(temperature, 1e-6)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
def generate(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    num_generations: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator,
) -> Rollout:
    """prompt_ids/prompt_mask: [B, Lp] left-padded -> G completions per prompt, rows of a group consecutive."""
    G = num_generations
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True)
    cache = returned_cache(out)
    cache.batch_repeat_interleave(G)
    logits = out.logits[:, -1].repeat_interleave(G, 0)
    attention_mask = prompt_mask.repeat_interleave(G, 0)
    next_pos = prompt_mask.sum(1).repeat_interleave(G, 0)

    N = logits.shape[0]
    tokens = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=prompt_ids.device)
    done = torch.zeros(N, dtype=torch.bool, device=prompt_ids.device)
    length = torch.zeros(N, dtype=torch.long, device=prompt_ids.device)
    for t in range(max_new_tokens):
        tok = sample_tokens(logits, temperature, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens[:, t] = tok
        length += (~done).long()
        done |= tok == eos_id
        if t == max_new_tokens - 1 or not any_rank(not bool(done.all())):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(tok)[:, None]], 1)
        out = model(
            input_ids=tok[:, None], attention_mask=attention_mask, position_ids=next_pos[:, None],
            use_cache=True, **{CACHE_KWARG: cache},
        )
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    width = int(length.max())
    mask = (torch.arange(width, device=tokens.device)[None] < length[:, None]).long()
    return Rollout(completion_ids=tokens[:, :width] * mask + pad_id * (1 - mask), completion_mask=mask)
