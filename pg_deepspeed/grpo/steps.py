"""One GRPO step's work, each a function of the engines and the batch: the rollout (sample, reward, advantage), the
fixed log-probs (old policy, reference), the update, and the supervised warm-up.

Every log-prob forward (policy, old policy, reference) goes through `completion_logprobs`, prefix-grouped unless
`--no_prefix_grouping`. Batch terms: a micro-batch is `prompts_per_device` prompts (groups) with their G completions
each; a step samples `prompts_per_device * gradient_accumulation_steps` prompts per replica and makes
`num_iterations` optimizer updates on them.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from pg_deepspeed.collectives import all_mean, broadcast_from_first
from pg_deepspeed.distributed.parallel_dims import ParallelDims
from pg_deepspeed.distributed.rollout_weights import gathered_for_generation
from pg_deepspeed.generation.sampling import Rollout, generate
from pg_deepspeed.grpo.advantages import group_advantages, node_advantages
from pg_deepspeed.grpo.args import GRPOArguments, TrainArguments
from pg_deepspeed.grpo.data import SFT_OFFSET, PromptSource, batch_indices
from pg_deepspeed.grpo.loss import grpo_loss
from pg_deepspeed.grpo.nonfinite import NonFiniteGuard
from pg_deepspeed.grpo.preemption import PreemptionGuard
from pg_deepspeed.grpo.prompts import PromptFormat
from pg_deepspeed.grpo.rewards import RewardFunctions, row_columns
from pg_deepspeed.grpo.vllm_rollout import VLLMRollout
from pg_deepspeed.layouts.packing import common_prefix_length, pack_completions
from pg_deepspeed.models.logprobs import completion_logprobs


@dataclass
class Batch:
    """One rank's rollout batch: B prompts, N = B·G completions, rows of a group consecutive."""

    prompt_ids: torch.Tensor       # [B, Lp] left-padded
    prompt_mask: torch.Tensor      # [B, Lp]
    completion_ids: torch.Tensor   # [N, Lc] right-padded
    completion_mask: torch.Tensor  # [N, Lc]
    rewards: torch.Tensor          # [N] the weighted sum of the reward functions
    advantages: torch.Tensor       # [N]
    old_logps: torch.Tensor | None = None  # [N, Lc]
    ref_logps: torch.Tensor | None = None  # [N, Lc]
    cache_bytes: int = 0  # the rollout's decode cache K/V at its largest
    samples: list[dict] | None = None  # per completion: the prompt as the model saw it, the completion, its reward
    reward_parts: torch.Tensor | None = None  # [N, K] float64: what each of the K reward functions returned
    rollout_logps: torch.Tensor | None = None  # [N, Lc] the sampler's own log-probs (--rollout_engine vllm)
    token_weights: torch.Tensor | None = None  # [N, Lc] truncated importance weights (--rollout_importance_correction)
    # multi-turn rollouts (--environment): completion_mask marks every real token after the prompt (assistant turns,
    # observations and the template's tokens between them: the attention layout), loss_mask only the tokens the
    # model sampled (what the loss covers). None: completion_mask, as in a single-turn rollout.
    loss_mask: torch.Tensor | None = None  # [N, Lc]
    rollout_metrics: dict[str, float] | None = None  # this rank's rollout statistics (turns_mean, tool_calls_mean)

    def micro_batches(self, train: TrainArguments, G: int) -> list["Batch"]:
        """The gradient_accumulation_steps micro-batches of prompts_per_device groups each, in order."""
        return [self.micro_batch(i, train.prompts_per_device, G) for i in range(train.gradient_accumulation_steps)]

    def micro_batch(self, i: int, prompts: int, G: int) -> "Batch":
        p, c = slice(i * prompts, (i + 1) * prompts), slice(i * prompts * G, (i + 1) * prompts * G)
        take = lambda x: None if x is None else x[c]
        return Batch(self.prompt_ids[p], self.prompt_mask[p], self.completion_ids[c], self.completion_mask[c],
                     self.rewards[c], self.advantages[c], take(self.old_logps), take(self.ref_logps),
                     rollout_logps=take(self.rollout_logps), token_weights=take(self.token_weights),
                     loss_mask=take(self.loss_mask))

    @property
    def trained_mask(self) -> torch.Tensor:
        """[N, Lc] the tokens the loss covers: the model's own tokens."""
        return self.completion_mask if self.loss_mask is None else self.loss_mask


def shared_preamble(batch: Batch, grpo: GRPOArguments) -> int:
    """Tokens every prompt of the micro-batch begins with, when worth sharing (>= --min_shared_preamble), else 0."""
    if grpo.no_prefix_grouping or grpo.min_shared_preamble == 0 or batch.prompt_ids.shape[0] < 2:
        return 0
    shared = common_prefix_length(batch.prompt_ids, batch.prompt_mask)
    return shared if shared >= grpo.min_shared_preamble else 0


def shares_completions(grpo: GRPOArguments) -> bool:
    """Whether a group's completions are packed as the tree of what they begin with in common: the turns of a
    multi-turn rollout (--environment), shared by its branches under --branching."""
    return grpo.environment is not None


def sequence_logprobs(model, batch: Batch, grpo: GRPOArguments) -> torch.Tensor:
    """[N, Lc] log-probs of the batch's completions (a multi-turn batch's sampled tokens only: 0 on its observations),
    prefix-grouped (with a shared preamble once when the micro-batch has one, and a multi-turn group's shared turns
    once) unless --no_prefix_grouping."""
    return completion_logprobs(
        model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, grpo.num_generations,
        temperature=grpo.temperature, prefix_grouping=not grpo.no_prefix_grouping,
        preamble=shared_preamble(batch, grpo), chunk_size=grpo.logprob_chunk_size,
        share_completions=shares_completions(grpo), score_mask=batch.loss_mask,  # observations: context only
    )


def policy_loss(model, batch: Batch, grpo: GRPOArguments, token_count: float | None = None
                ) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of one micro-batch (differentiable w.r.t. the policy's parameters).

    token_count: token-mean's divisor (see `update`); default the micro-batch's own completion tokens.
    """
    logps = sequence_logprobs(model, batch, grpo)
    old = batch.old_logps if batch.old_logps is not None else logps.detach()
    return grpo_loss(
        logps, old, batch.ref_logps, batch.advantages, batch.trained_mask,
        epsilon=grpo.epsilon, epsilon_high=grpo.epsilon_high, beta=grpo.beta,
        aggregation=grpo.loss_aggregation, max_completion_length=grpo.max_new_tokens, token_count=token_count,
        token_weights=batch.token_weights,
    )


def micro_batch_token_count(batch: Batch, train: TrainArguments) -> float:
    """token-mean's divisor for each micro-batch, so that the update is the mean over every completion token of
    the optimizer step, all ranks and micro-batches (DAPO; TRL's `dapo`), not a mean of per-micro-batch means.

    DeepSpeed averages gradients over the data-parallel ranks and divides each micro-batch's loss by
    gradient_accumulation_steps, so a micro-batch's sum is divided by the step's tokens / (ranks × micro-batches):
    the mean over ranks of this rank's tokens, over the micro-batches. Collective: every rank calls it.
    """
    return all_mean({"tokens": float(batch.trained_mask.sum())})["tokens"] / train.gradient_accumulation_steps


def rollout(policy, prompt_format: PromptFormat, source: PromptSource, rewards: RewardFunctions, grpo: GRPOArguments,
            train: TrainArguments, step: int, dims: ParallelDims, rank: int, device: torch.device,
            guard: PreemptionGuard, vllm: VLLMRollout | None = None) -> Batch:
    """Sample prompts for this data-parallel replica and step, G completions each, their rewards (each function's
    and the weighted sum) and advantages (from the weighted sum).

    Every rank of a sequence-parallel group is the same replica: same prompts, same seed, and the completions of
    the group's first rank (so that they cannot drift apart). Raises :class:`Preempted` on every rank when a stop
    is requested during generation."""
    per_rank = train.prompts_per_device * train.gradient_accumulation_steps
    replica = dims.replica(rank)
    examples = [source.example(i) for i in batch_indices(step, replica, dims.dp, per_rank)]
    tokenizer = prompt_format.tokenizer
    prompt_ids, prompt_mask = prompt_format.batch([e.prompt for e in examples], device)
    seed = hash((train.seed, step, replica)) % 2**63
    out = sample(policy, prompt_ids, prompt_mask, grpo.num_generations, grpo, tokenizer,
                 torch.Generator().manual_seed(seed), grpo.temperature, dims, guard, vllm=vllm, seed=seed)
    G = grpo.num_generations
    texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    total, parts = rewards.score(
        [e.prompt for e in examples for _ in range(G)], texts, [e.answer for e in examples for _ in range(G)],
        row_columns([e.columns for e in examples], G),
    )
    reward = torch.tensor(total, dtype=torch.float32, device=device)
    sizes = torch.full((len(examples),), G, dtype=torch.long, device=device)
    shown = [prompt_format.text(e.prompt) for e in examples]
    samples = [{"prompt": shown[n // G], "completion": text, "reward": r,
                **{f"reward/{name}": part[n] for name, part in zip(rewards.names, parts)}}
               for n, (text, r) in enumerate(zip(texts, total))]
    return Batch(prompt_ids, prompt_mask, out.completion_ids, out.completion_mask, reward,
                 advantages_of(reward, out.completion_ids, out.completion_mask, sizes, grpo),
                 cache_bytes=out.cache_bytes,
                 reward_parts=torch.tensor(parts, dtype=torch.float64, device=device).T.contiguous(), samples=samples,
                 rollout_logps=out.logprobs)


def advantages_of(rewards: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                  sizes: torch.Tensor, grpo: GRPOArguments) -> torch.Tensor:
    """Advantages of a rollout: [N], --advantage over each group (--advantage_level sequence), or [N, Lc], each
    token's from the tree of what its group's completions share (node)."""
    if grpo.advantage_level == "node":
        return node_advantages(rewards, completion_ids, completion_mask, sizes)
    return group_advantages(rewards, sizes, grpo.advantage)


@contextmanager
def gathered_once(policy, grpo: GRPOArguments, vllm: VLLMRollout | None = None) -> Iterator[GRPOArguments]:
    """Around several :func:`sample` calls (a multi-turn rollout's turns, an evaluation's batches): with the built-in
    engine under --rollout_gather full the policy's weights are gathered once for all of them, where each call would
    gather the whole model again; yields the options the calls take (per-layer inside, the weights being whole
    already). Otherwise nothing is gathered here and the options are `grpo`. Collective under ZeRO-3."""
    once = vllm is None and grpo.rollout_gather == "full"
    with gathered_for_generation(policy, "full" if once else "per_layer"):
        yield replace(grpo, rollout_gather="per_layer") if once else grpo


def sample(policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, G: int, grpo: GRPOArguments, tokenizer,
           generator: torch.Generator, temperature: float, dims: ParallelDims,
           guard: PreemptionGuard | None = None, vllm: VLLMRollout | None = None, seed: int = 0) -> Rollout:
    """G completions of each prompt ([B, Lp] left-padded) by the policy in eval mode, its weights gathered as
    --rollout_gather says (temperature 0: greedy). Under sequence parallelism every rank of a group gets its first
    rank's completions. Collective under ZeRO-3: every rank calls it the same number of times.

    With `vllm` (--rollout_engine vllm) the engine samples instead, seeded by `seed` (not `generator`), after a
    weight sync when the policy changed since the last one; the rollout then carries the engine's log-probs."""
    if vllm is not None:
        vllm.refresh(policy)
        return vllm.sample(prompt_ids, prompt_mask, G, tokenizer, temperature, seed)
    module = getattr(policy, "module", policy)
    was_training = module.training
    module.eval()
    try:
        with gathered_for_generation(policy, grpo.rollout_gather):
            out = generate(
                guard.interruptible(module) if guard is not None else module, prompt_ids, prompt_mask, G,
                max_new_tokens=grpo.max_new_tokens, temperature=temperature, top_p=grpo.top_p,
                eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, generator=generator,
                cache=grpo.rollout_cache, prefill_chunk=grpo.rollout_prefill_chunk,
            )
    finally:
        module.train(was_training)
    if dims.sp > 1:
        out.completion_ids, out.completion_mask = broadcast_from_first(
            [out.completion_ids, out.completion_mask], policy.get_sequence_parallel_group())
    return out


@torch.no_grad()
def fill_fixed_logprobs(batch: Batch, policy, reference, grpo: GRPOArguments, train: TrainArguments) -> None:
    """Old-policy log-probs (needed when updating more than once, and computed for every step of a sampler that
    returns its own log-probs, to compare: see vllm_rollout.py) and reference log-probs (beta > 0)."""
    parts = batch.micro_batches(train, grpo.num_generations)
    if grpo.num_iterations > 1 or batch.rollout_logps is not None:
        batch.old_logps = torch.cat([sequence_logprobs(policy, p, grpo) for p in parts])
    if reference is not None:
        batch.ref_logps = torch.cat([sequence_logprobs(reference, p, grpo) for p in parts])  # the engine: see logprobs


def update(policy, batch: Batch, grpo: GRPOArguments, train: TrainArguments, guard: NonFiniteGuard,
           step: int) -> dict:
    """num_iterations passes over the batch's micro-batches; DeepSpeed steps at each accumulation boundary, where
    `guard` checks the step (a non-finite one is skipped on every rank). Returns the means of the finite
    micro-batches' loss, kl and clip_frac (NaN when none was), and `nonfinite_skips`, the optimizer steps skipped."""
    totals, finite_parts, skips = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0}, 0, 0
    token_count = micro_batch_token_count(batch, train)
    parts = batch.micro_batches(train, grpo.num_generations)
    for iteration in range(grpo.num_iterations):
        all_finite = True
        for part in parts:
            loss, stats = policy_loss(policy, part, grpo, token_count)
            policy.backward(loss)  # also when not finite: every rank's backward is a collective under ZeRO-3
            policy.step()
            if math.isfinite(loss.item()):
                totals = {"loss": totals["loss"] + loss.item(), "kl": totals["kl"] + stats["kl"],
                          "clip_frac": totals["clip_frac"] + stats["clip_frac"]}
                finite_parts += 1
            else:
                all_finite = False
        skips += guard.after_step(policy, all_finite, f"step {step}, update {iteration + 1}")
    means = {k: v / finite_parts if finite_parts else math.nan for k, v in totals.items()}
    return {**means, "nonfinite_skips": float(skips)}


def prefix_tokens_saved(batch: Batch, grpo: GRPOArguments, train: TrainArguments) -> int:
    """Tokens one log-prob pass over the batch did not recompute: each micro-batch's packed layout's own count
    (the G-1 repeats of every prompt, a shared preamble's and a multi-turn group's shared turns' repeats, each
    against its members forwarded alone), 0 with --no_prefix_grouping."""
    if grpo.no_prefix_grouping:
        return 0
    G = grpo.num_generations
    packings = (pack_completions(p.prompt_ids, p.prompt_mask, p.completion_ids, p.completion_mask,
                                 [G] * len(p.prompt_ids), shared_preamble(p, grpo), shares_completions(grpo))
                for p in batch.micro_batches(train, G))
    return sum(packing.prefix_tokens_saved for packing in packings)


def sft_warmup(policy, prompt_format: PromptFormat, source: PromptSource, grpo: GRPOArguments, train: TrainArguments, dims: ParallelDims,
               rank: int, device: torch.device, first: int, stop: Callable[[], bool], guard: NonFiniteGuard) -> int:
    """Supervised steps ``first``.. on `answer + EOS` (negative mean log-prob), on prompts the GRPO steps never see.

    Polls ``stop()`` after each step; returns the number of warm-up steps done (all of them unless stopped)."""
    tokenizer, eos = prompt_format.tokenizer, prompt_format.tokenizer.eos_token_id
    for step in range(first, train.sft_warmup_steps):
        all_finite = True
        for i in range(train.gradient_accumulation_steps):
            indices = batch_indices(step * train.gradient_accumulation_steps + i, dims.replica(rank), dims.dp,
                                    train.prompts_per_device)
            examples = [source.example(SFT_OFFSET + j) for j in indices]
            prompt_ids, prompt_mask = prompt_format.batch([e.prompt for e in examples], device)
            answers = [tokenizer(e.answer, add_special_tokens=False)["input_ids"] + [eos] for e in examples]
            width = max(len(a) for a in answers)
            ids = torch.full((len(answers), width), tokenizer.pad_token_id, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for r, a in enumerate(answers):
                ids[r, : len(a)], mask[r, : len(a)] = torch.tensor(a, device=device), 1
            logps = completion_logprobs(policy, prompt_ids, prompt_mask, ids, mask, 1,
                                        chunk_size=grpo.logprob_chunk_size)
            loss = -(logps * mask).sum() / mask.sum()
            policy.backward(loss)
            policy.step()
            all_finite &= math.isfinite(loss.item())
        guard.after_step(policy, all_finite, f"warm-up step {step + 1}")
        if stop():
            return step + 1
    return train.sft_warmup_steps
