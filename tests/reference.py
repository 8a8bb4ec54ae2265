"""Naive references. Every equivalence test compares against these, never against the code under test."""
from __future__ import annotations

import math
import random

import torch
from torch import Tensor


def dense_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                           sinks: Tensor | None = None) -> Tensor:
    """q: [L, Hq, D], k/v: [L, Hkv, D] -> [L, Hq, D], plain softmax attention with a causal mask.

    sinks: [Hq] logits appended as one more softmax column per head and dropped after (gpt-oss's eager code).
    """
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype)[:, None, None].expand(-1, s.shape[1], 1)], -1)
    p = torch.softmax(s, -1)[..., : k.shape[0]]
    return torch.einsum("hqk,khd->qhd", p, v)


def repeated_prefix_attention(q, k, v, prefix_lens, suffix_lens, scale=None, sinks=None):
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
                torch.cat([q[pre], q[suf]]), torch.cat([k[pre], k[suf]]), torch.cat([v[pre], v[suf]]), scale, sinks
            )
            if i == 0:
                out[pre] = o[:p]
            out[suf] = o[p:]
    return out


def tree_path_attention(q, k, v, parents, lengths, scale=None, sinks=None):
    """Every segment's rows computed from its own root-to-segment path alone: dense causal attention over the
    concatenated path tokens, the segment's rows kept. q, k, v: packed [T, H, D] in segment order."""
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    out = torch.empty_like(q)
    for s in range(len(lengths)):
        path, node = [], s
        while node >= 0:
            path.append(node)
            node = parents[node]
        rows = torch.cat([torch.arange(starts[n], starts[n + 1]) for n in reversed(path)])
        out[starts[s]:starts[s + 1]] = dense_causal_attention(q[rows], k[rows], v[rows], scale, sinks)[-lengths[s]:]
    return out


def padded_completion_logprobs(
    model, prompt_ids, prompt_mask, completion_ids, completion_mask, group_size, temperature=1.0
):
    """The standard batch through an unpatched causal LM: each prompt repeated G times beside its completion.

    prompt_*: [B, Lp] (any padding; moved to the left, as TRL holds them), completion_*: [N, Lc]
    right-padded; returns (logps, entropies), both [N, Lc] float32 and 0 at masked places. Full
    [N, L, V] logits from `model.lm_head` on `model.model`'s hidden states, then TRL's logit scale
    (`logit_scale` / `logits_scaling` only), softcap and temperature; positions count real tokens.
    """
    sizes = [group_size] * prompt_ids.shape[0] if isinstance(group_size, int) else list(group_size)
    repeats = torch.tensor(sizes)
    left = [torch.cat([ids[m == 0], ids[m != 0]]) for ids, m in zip(prompt_ids, prompt_mask)]
    prompt_mask = torch.stack([m.sort(stable=True).values for m in prompt_mask])
    prompt_ids = torch.stack(left)
    ids = torch.cat([prompt_ids.repeat_interleave(repeats, 0), completion_ids], 1)
    mask = torch.cat([prompt_mask.repeat_interleave(repeats, 0), completion_mask], 1)
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
    logits = model.lm_head(hidden).float()
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


TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
TINY_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "qwen3_moe": (
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
        {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    ),
}


def tiny_causal_lm(family: str, seed: int = 0, **overrides):
    """A random-init float32 causal LM of `family` (a key of TINY_FAMILIES), sdpa attention, eval mode."""
    import transformers

    config_cls, model_cls, extra = TINY_FAMILIES[family]
    kwargs = {**TINY, **extra, "attn_implementation": "sdpa", **overrides}
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).eval()


def random_grpo_batch(seed: int, padding_side: str, vocab_size: int = 128):
    """A seeded GRPO micro-batch: (prompt_ids, prompt_mask [B, Lp], completion_ids, completion_mask [N, Lc], sizes).

    1-3 prompts of 1-9 tokens padded on `padding_side`, 1-4 completions each of 1-6 tokens (one of
    length 1 always), right-padded; padded places hold random tokens, not a pad id.
    """
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    sizes = [rand(1, 4) for _ in range(rand(1, 3))]
    prompt_lens = [rand(1, 9) for _ in sizes]
    completion_lens = [rand(1, 6) for _ in range(sum(sizes))]
    completion_lens[rand(0, len(completion_lens) - 1)] = 1
    Lp, Lc = max(prompt_lens) + rand(0, 2), max(completion_lens) + rand(0, 1)
    prompt_ids = torch.randint(0, vocab_size, (len(sizes), Lp), generator=g)
    completion_ids = torch.randint(0, vocab_size, (len(completion_lens), Lc), generator=g)
    cols = torch.arange(Lp)
    p = torch.tensor(prompt_lens)[:, None]
    prompt_mask = (cols >= Lp - p) if padding_side == "left" else (cols < p)
    completion_mask = torch.arange(Lc) < torch.tensor(completion_lens)[:, None]
    return prompt_ids, prompt_mask.long(), completion_ids, completion_mask.long(), sizes


def tiny_gpt_oss(seed: int = 0):
    """A random-init float32 gpt-oss (attention sinks `s_aux`, MoE, alternating 64-token sliding windows), eager."""
    import transformers

    config = transformers.GptOssConfig(
        **{**TINY, "num_local_experts": 2, "num_experts_per_tok": 1, "head_dim": 16, "sliding_window": 64},
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():  # sinks big enough to matter (the init draws them near 0)
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


VOCAB = 128  # the tiny models' vocabulary


def random_tree_batch(seed: int, padding_side: str = "left", max_depth: int = 4, preamble: int = 0):
    """B groups, each a prompt and the leaves of a random sampling tree of depth 1..max_depth as its completions.

    Every node is a turn of 1 to 24 tokens (one in four a single token); a node has 1 to 3 children. Returns
    (prompt_ids [B, Lp], prompt_mask, completion_ids [N, Lc] right-padded, completion_mask, sizes)."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(3, VOCAB) for _ in range(n)]
    turn = lambda: tok(1 if rng.random() < 0.25 else rng.randint(2, 24))
    shared = tok(preamble)
    prompts, completions, sizes = [], [], []
    for _ in range(rng.randint(1, 3)):
        prompts.append(shared + tok(rng.randint(0 if preamble else 1, 9)))
        depth = rng.randint(1, max_depth)
        frontier = [[]]
        for level in range(depth):
            frontier = [path + turn() for path in frontier for _ in range(rng.randint(1, 3) if level < 3 else 1)]
        completions += frontier
        sizes.append(len(frontier))
    Lp, Lc = max(map(len, prompts)) + rng.randint(0, 2), max(map(len, completions)) + rng.randint(0, 2)
    prompt_ids, prompt_mask = torch.zeros(len(prompts), Lp, dtype=torch.long), torch.zeros(len(prompts), Lp,
                                                                                          dtype=torch.long)
    for b, p in enumerate(prompts):
        cols = slice(Lp - len(p), Lp) if padding_side == "left" else slice(0, len(p))
        prompt_ids[b, cols], prompt_mask[b, cols] = torch.tensor(p), 1
    completion_ids = torch.zeros(len(completions), Lc, dtype=torch.long)
    completion_mask = torch.zeros(len(completions), Lc, dtype=torch.long)
    for n, c in enumerate(completions):
        completion_ids[n, :len(c)], completion_mask[n, :len(c)] = torch.tensor(c), 1
    return prompt_ids, prompt_mask, completion_ids, completion_mask, sizes


def worst_relative_grad_error(model, reference) -> float:
    """max over parameters of |grad - reference grad| / |reference grad| (a parameter whose reference gradient is 0
    or None must have none either)."""
    errors = []
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if q.grad is None or q.grad.norm() == 0:
            assert p.grad is None or p.grad.norm() == 0, name
            continue
        errors.append(float((p.grad - q.grad).norm() / q.grad.norm()))
    return max(errors)
