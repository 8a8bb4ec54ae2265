"""The clipped GRPO objective with an optional k3 KL to the reference, and its aggregations.

Per completion token t of member i, with ratio ρ = exp(logp - logp_old) and advantage A_i:
  l_t = -w_t·min(ρ·A_i, clip(ρ, 1-ε, 1+ε_high)·A_i) + β·(exp(ref - logp) - (ref - logp) - 1)
where w_t is a constant per-token weight, 1 unless given (truncated importance sampling: see vllm_rollout.py).
Aggregations over the [N, Lc] mask M:
  token-mean            Σ l·M / T, T = the token count the caller names (DAPO's mean over every completion
                        token of the optimizer step; see `update` in trainer.py), Σ M when it names none
  seq-mean-token-mean   mean_i (Σ_t l·M / Σ_t M)
  dr_grpo               Σ l·M / (N · max_completion_length)
"""
from __future__ import annotations

import torch
from torch import Tensor

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "dr_grpo")


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    ref_logps: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    aggregation: str = "token-mean",
    max_completion_length: int | None = None,
    token_count: float | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """logps, old_logps, ref_logps, completion_mask: [N, Lc]; advantages: [N] or [N, Lc] -> (loss, stats).

    token_count: the divisor of token-mean (default: this batch's own Σ M).
    token_weights: [N, Lc] w_t multiplying each token's clipped policy term (not the KL), taken as constants.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs reference log-probs")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(logps.dtype)
    adv = advantages.to(logps.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv  # [N] per completion, or [N, Lc] per token (node_advantages)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if token_weights is not None:
        per_token = per_token * token_weights.detach().to(per_token.dtype)
    kl = torch.zeros_like(logps)
    if beta != 0.0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl

    tokens = mask.sum().clamp(min=1)
    if aggregation == "token-mean":
        loss = (per_token * mask).sum() / (tokens if token_count is None else max(float(token_count), 1.0))
    elif aggregation == "seq-mean-token-mean":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    else:
        width = max_completion_length or logps.shape[1]
        loss = (per_token * mask).sum() / (logps.shape[0] * width)

    with torch.no_grad():
        is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats = {
            "clip_frac": float((is_clipped.to(mask.dtype) * mask).sum() / tokens),
            "kl": float((kl * mask).sum() / tokens),
        }
    return loss, stats
