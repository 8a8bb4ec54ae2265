"""Sampling G completions per prompt with a prefix-once prefill, and a decode cache that holds each prompt once.

Each prompt is prefilled once, in chunks of about `prefill_chunk` tokens per forward (across the batch's prompts) so
that only one chunk's activations and attention mask are alive at a time (the prompt's K/V is what the cache keeps;
the activations of a whole long prompt at once can be larger than all of it). Decoding then runs token by token
through one of two caches:
- `cache="shared"` (the default): `cache.SharedPrefixCache` keeps each group's prompt K/V once and each sample's
  generated K/V on its own; decode attention merges the two by log-sum-exp. Needs a patched model (`patch_model`).
- `cache="repeat"`: transformers' DynamicCache repeated to the G samples (`batch_repeat_interleave(G)`), decoded with
  the model's own attention; it holds B·G copies of the prompt's K/V (kept for A/B comparisons).

Under ZeRO-3 every forward gathers each layer's parameters with a collective (unless the weights are gathered once
around the rollout, `distributed/rollout_weights.py`), so all ranks must run the same number of forwards: the loop
stops only when every rank is done (an all-reduce per token; the preemption guard's polls rely on it too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from pg_deepspeed.generation.shared_prefix_cache import SharedPrefixCache
from pg_deepspeed.models.transformers_compat import CACHE_KWARG, returned_cache
from pg_deepspeed.collectives import any_rank, max_over_ranks


CACHE_MODES = ("shared", "repeat")
DEFAULT_PREFILL_CHUNK = 2048  # prompt tokens per prefill forward: bounds the prefill's activations (0 = whole)


@dataclass
class Rollout:
    completion_ids: Tensor   # [N, Lc], right-padded with pad_id
    completion_mask: Tensor  # [N, Lc], 1 on generated tokens (EOS included)
    cache_bytes: int = 0     # the decode cache's K/V at its largest (after the last step)
    step_logits: list[Tensor] | None = None  # with keep_logits: the model's next-token logits [N, V] of every step
    logprobs: Tensor | None = None  # [N, Lc] float32: the sampler's log-prob of each token, 0 at padding (vLLM's)


def sample_tokens(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> Tensor:
    """logits: [N, V] -> token ids [N], with temperature and nucleus (top-p) filtering; temperature 0 is greedy (the
    argmax, the generator untouched)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
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
    num_generations: int | Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator,
    cache: str = "shared",
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    keep_logits: bool = False,
) -> Rollout:
    """prompt_ids/prompt_mask: [B, Lp] left-padded -> G_b completions of prompt b (num_generations: one G for all or
    B of them), rows of a group consecutive. cache: "shared" or "repeat" (see the module docstring).
    prefill_chunk: prompt tokens per prefill forward, all B prompts together: each forward takes
        max(1, prefill_chunk // B) columns (0 = the whole prompt in one forward); see `prefill`."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if prefill_chunk < 0:
        raise ValueError(f"prefill_chunk must be >= 0 (0 = the whole prompt at once), got {prefill_chunk}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    B = prompt_ids.shape[0]
    sizes = [num_generations] * B if isinstance(num_generations, int) else [int(g) for g in num_generations]
    if len(sizes) != B or min(sizes, default=1) < 1:
        raise ValueError(f"num_generations must be one G >= 1 per prompt ({B} prompts), got {num_generations!r}")
    repeats = torch.tensor(sizes, device=prompt_ids.device)
    calls = prefill_calls(prompt_ids.shape[1], prefill_chunk and max(1, prefill_chunk // B))
    prompt_ids, prompt_mask = left_pad(prompt_ids, prompt_mask, calls, pad_id)  # a chunk holds >= 1 column
    shared = SharedPrefixCache(prompt_mask, sizes, max_new_tokens) if cache == "shared" else None
    out = prefill(model, prompt_ids, prompt_mask, calls, shared)
    if shared is not None:
        kv, extra = shared, {"shared_prefix": shared}
        shared.start_decoding()
    else:
        kv, extra = returned_cache(out), {}
        if len(set(sizes)) == 1:
            kv.batch_repeat_interleave(sizes[0])
        else:
            kv.batch_select_indices(torch.repeat_interleave(torch.arange(B, device=prompt_ids.device), repeats))
    logits = out.logits[:, -1].repeat_interleave(repeats, 0)
    attention_mask = prompt_mask.repeat_interleave(repeats, 0)
    next_pos = prompt_mask.sum(1).repeat_interleave(repeats, 0)

    N = logits.shape[0]
    tokens = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=prompt_ids.device)
    done = torch.zeros(N, dtype=torch.bool, device=prompt_ids.device)
    length = torch.zeros(N, dtype=torch.long, device=prompt_ids.device)
    kept = [logits.float()] if keep_logits else None
    for t in range(max_new_tokens):
        tok = sample_tokens(logits, temperature, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens[:, t] = tok
        length += (~done).long()
        done |= tok == eos_id
        if t == max_new_tokens - 1 or not any_rank(not bool(done.all())):
            break
        if shared is None:  # the shared cache defines its own attention (prompt mask and causal generated part)
            attention_mask = torch.cat([attention_mask, torch.ones_like(tok)[:, None]], 1)
        out = model(
            input_ids=tok[:, None], attention_mask=None if shared is not None else attention_mask,
            position_ids=next_pos[:, None], use_cache=True, **{CACHE_KWARG: kv}, **extra,
        )
        if shared is not None:
            shared.check_step()
        logits = out.logits[:, -1]
        if kept is not None:
            kept.append(logits.float())
        next_pos = next_pos + 1
    width = int(length.max())
    mask = (torch.arange(width, device=tokens.device)[None] < length[:, None]).long()
    return Rollout(completion_ids=tokens[:, :width] * mask + pad_id * (1 - mask), completion_mask=mask,
                   cache_bytes=shared.peak_bytes if shared is not None else kv_bytes(kv), step_logits=kept)


def prefill_calls(prompt_len: int, chunk: int) -> int:
    """How many prefill forwards of `chunk` columns (0 = all): ceil(P / chunk) here, the most of any rank under
    torch.distributed. ZeRO-3's per-layer gathering is a collective in every forward, so every rank must make the same
    number of them."""
    calls = 1 if chunk == 0 else -(-prompt_len // chunk)
    return max_over_ranks(calls)


def left_pad(prompt_ids: Tensor, prompt_mask: Tensor, width: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """[B, Lp] -> [B, max(Lp, width)], extra pad columns on the left (masked: nothing attends to them)."""
    extra = width - prompt_ids.shape[1]
    if extra <= 0:
        return prompt_ids, prompt_mask
    return (torch.cat([prompt_ids.new_full((prompt_ids.shape[0], extra), pad_id), prompt_ids], 1),
            torch.cat([prompt_mask.new_zeros(prompt_mask.shape[0], extra), prompt_mask], 1))


def prefill(model, prompt_ids: Tensor, prompt_mask: Tensor, calls: int, shared: SharedPrefixCache | None):
    """Each prompt once, through `calls` forwards over consecutive column chunks of near-equal width: chunk c's
    queries attend to the cached columns before it and causally within it (the same attention as one forward), so
    only one chunk's activations are alive at a time. Returns the last forward's output (the last position's
    logits only: no [B, P, V] logits), its cache holding the whole prompt (`shared`, or the model's own cache)."""
    B, P = prompt_ids.shape
    if calls > P:
        raise ValueError(f"{calls} prefill chunks for {P} prompt columns (left_pad the prompt first)")
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    kv, out, start = shared, None, 0
    for c in range(calls):
        end = start + P // calls + (c < P % calls)
        out = model(input_ids=prompt_ids[:, start:end], attention_mask=prompt_mask[:, :end],
                    position_ids=positions[:, start:end], use_cache=True, logits_to_keep=1,
                    **({CACHE_KWARG: kv} if kv is not None else {}))
        kv, start = (shared if shared is not None else returned_cache(out)), end
    return out


def kv_bytes(cache) -> int:
    """Bytes of the K/V tensors a transformers cache holds now."""
    tensors = [t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))
