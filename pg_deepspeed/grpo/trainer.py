"""The GRPO loop, top to bottom: set-up, then per step rollout, reward, advantage, update, log, checkpoint.

Every log-prob forward (policy, old policy, reference) goes through `completion_logprobs`, prefix-grouped
unless `--no_prefix_grouping`. Batch terms: a micro-batch is `prompts_per_device` prompts (groups) with
their G completions each; a step samples `prompts_per_device * gradient_accumulation_steps` prompts per
rank and makes `num_iterations` optimizer updates on them.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Callable

import deepspeed
import torch
import torch.distributed as dist
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from pg_deepspeed.attention import check_backend_name
from pg_deepspeed.distributed.engines import build_model, check_patchable, init_policy, init_reference, load_config, load_tokenizer
from pg_deepspeed.distributed.checkpoint import current_rng_state, load_checkpoint, save_checkpoint
from pg_deepspeed.distributed.ds_config import DTYPES, dtype_name, load_ds_config
from pg_deepspeed.distributed.export import export_hf
from pg_deepspeed.distributed.rollout_weights import GATHER_MODES, gathered_for_generation
from pg_deepspeed.models.logprobs import completion_logprobs
from pg_deepspeed.layouts.packing import common_prefix_length
from pg_deepspeed.models.patch import patch_model
from pg_deepspeed.distributed.sequence_parallel import check_sequence_parallel_size, gradient_scale
from pg_deepspeed.distributed.peak_memory import PeakMemory
from pg_deepspeed.grpo.advantages import ESTIMATORS, group_advantages
from pg_deepspeed.grpo.args import (DEFAULT_CURRICULUM_START, DEFAULT_SFT_WARMUP_STEPS, DataArguments, GRPOArguments, ModelArguments,
                   TrainArguments)
from pg_deepspeed.collectives import all_gather_cat, all_mean, broadcast_from_first
from pg_deepspeed.grpo.data import (SFT_OFFSET, Curriculum, PromptSource, batch_indices, build_source, longest_prompt,
                   tokenize_prompts)
from pg_deepspeed.grpo.loss import AGGREGATIONS, grpo_loss
from pg_deepspeed.grpo.metrics import MetricsLogger
from pg_deepspeed.grpo.preemption import Preempted, PreemptionGuard, node_rank
from pg_deepspeed.grpo.rewards import compute_rewards, resolve_reward_fn
from pg_deepspeed.generation.sampling import CACHE_MODES, generate


@dataclass
class Batch:
    """One rank's rollout batch: B prompts, N = B·G completions, rows of a group consecutive."""

    prompt_ids: torch.Tensor       # [B, Lp] left-padded
    prompt_mask: torch.Tensor      # [B, Lp]
    completion_ids: torch.Tensor   # [N, Lc] right-padded
    completion_mask: torch.Tensor  # [N, Lc]
    rewards: torch.Tensor          # [N]
    advantages: torch.Tensor       # [N]
    old_logps: torch.Tensor | None = None  # [N, Lc]
    ref_logps: torch.Tensor | None = None  # [N, Lc]
    cache_bytes: int = 0  # the rollout's decode cache K/V at its largest

    def micro_batch(self, i: int, prompts: int, G: int) -> "Batch":
        p, c = slice(i * prompts, (i + 1) * prompts), slice(i * prompts * G, (i + 1) * prompts * G)
        take = lambda x: None if x is None else x[c]
        return Batch(self.prompt_ids[p], self.prompt_mask[p], self.completion_ids[c], self.completion_mask[c],
                     self.rewards[c], self.advantages[c], take(self.old_logps), take(self.ref_logps))


def check_args(model: ModelArguments, data: DataArguments, grpo: GRPOArguments, train: TrainArguments) -> None:
    """Refuse contradictory or impossible settings before any heavy work."""
    if not os.path.isfile(train.ds_config):
        raise FileNotFoundError(f"--ds_config {train.ds_config!r} does not exist")
    try:
        check_backend_name(model.attention_backend)
    except ValueError as error:
        raise ValueError(f"--attention_backend: {error}") from None
    try:
        dtype_name(model.dtype)
    except ValueError as error:
        raise ValueError(f"--{error}") from None
    if grpo.advantage not in ESTIMATORS:
        raise ValueError(f"--advantage must be one of {ESTIMATORS}, got {grpo.advantage!r}")
    if grpo.loss_aggregation not in AGGREGATIONS:
        raise ValueError(f"--loss_aggregation must be one of {AGGREGATIONS}, got {grpo.loss_aggregation!r}")
    if grpo.num_generations < 2 and grpo.advantage in ("grpo", "rloo"):
        raise ValueError(f"--num_generations must be >= 2 for --advantage {grpo.advantage} (got {grpo.num_generations})")
    for name in ("max_new_tokens", "num_iterations", "prompts_per_device", "gradient_accumulation_steps", "max_steps"):
        value = getattr(grpo, name, getattr(train, name, None))
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    for name in ("save_steps", "save_total_limit", "sft_warmup_steps"):
        if getattr(train, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(train, name)}")
    if not 0.0 < grpo.top_p <= 1.0:
        raise ValueError(f"--top_p must be in (0, 1], got {grpo.top_p}")
    if grpo.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {grpo.temperature}")
    if grpo.beta < 0:
        raise ValueError(f"--beta must be >= 0, got {grpo.beta}")
    if grpo.rollout_cache not in CACHE_MODES:
        raise ValueError(f"--rollout_cache must be one of {CACHE_MODES}, got {grpo.rollout_cache!r}")
    if grpo.rollout_gather not in GATHER_MODES:
        raise ValueError(f"--rollout_gather must be one of {GATHER_MODES}, got {grpo.rollout_gather!r}")
    if grpo.rollout_prefill_chunk < 0:
        raise ValueError(f"--rollout_prefill_chunk must be >= 0 (0 = the whole prompt at once), "
                         f"got {grpo.rollout_prefill_chunk}")
    if grpo.logprob_chunk_size < 1:
        raise ValueError(f"--logprob_chunk_size must be >= 1, got {grpo.logprob_chunk_size}")
    if grpo.min_shared_preamble < 0:
        raise ValueError(f"--min_shared_preamble must be >= 0 (0 = never), got {grpo.min_shared_preamble}")


def curriculum_of(data: DataArguments, max_steps: int) -> Curriculum | None:
    """The prompt-length curriculum the options ask for. Unset, the built-in tasks grow from
    DEFAULT_CURRICULUM_START tokens (when --prompt_length is longer) and a --dataset has none; 0 turns it off."""
    start = data.curriculum_start_length
    if start is None:
        if data.dataset is not None or data.prompt_length <= DEFAULT_CURRICULUM_START:
            return None
        start = DEFAULT_CURRICULUM_START
    if start == 0:
        return None
    if not 0.0 < data.curriculum_fraction <= 1.0:
        raise ValueError(f"--curriculum_fraction must be in (0, 1], got {data.curriculum_fraction}")
    try:
        return Curriculum(start, data.prompt_length, steps=max(1, round(data.curriculum_fraction * max_steps)))
    except ValueError as error:
        raise ValueError(f"--curriculum_start_length {start} (--prompt_length {data.prompt_length}): {error}") from None


def check_prompt_lengths(tokenizer, source: PromptSource, config, max_new_tokens: int) -> int:
    """The longest prompt + ``max_new_tokens`` (the run's longest sequence); refused past the model's positions."""
    limit = getattr(config, "max_position_embeddings", None)
    longest, index = longest_prompt(tokenizer, source)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(
            f"prompt {index} of {source.name} is {longest} tokens; with --max_new_tokens {max_new_tokens} it exceeds "
            f"the model's max_position_embeddings ({limit})"
        )
    return longest + max_new_tokens


def shared_preamble(batch: Batch, grpo: GRPOArguments) -> int:
    """Tokens every prompt of the micro-batch begins with, when worth sharing (>= --min_shared_preamble), else 0."""
    if grpo.no_prefix_grouping or grpo.min_shared_preamble == 0 or batch.prompt_ids.shape[0] < 2:
        return 0
    shared = common_prefix_length(batch.prompt_ids, batch.prompt_mask)
    return shared if shared >= grpo.min_shared_preamble else 0


def sequence_logprobs(model, batch: Batch, grpo: GRPOArguments) -> torch.Tensor:
    """[N, Lc] log-probs of the batch's completions, prefix-grouped (with a shared preamble once when the micro-batch
    has one) unless --no_prefix_grouping."""
    return completion_logprobs(
        model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, grpo.num_generations,
        temperature=grpo.temperature, prefix_grouping=not grpo.no_prefix_grouping,
        preamble=shared_preamble(batch, grpo), chunk_size=grpo.logprob_chunk_size,
    )


def policy_loss(model, batch: Batch, grpo: GRPOArguments, token_count: float | None = None
                ) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of one micro-batch (differentiable w.r.t. the policy's parameters).

    token_count: token-mean's divisor (see `update`); default the micro-batch's own completion tokens.
    """
    logps = sequence_logprobs(model, batch, grpo)
    old = batch.old_logps if batch.old_logps is not None else logps.detach()
    return grpo_loss(
        logps, old, batch.ref_logps, batch.advantages, batch.completion_mask,
        epsilon=grpo.epsilon, epsilon_high=grpo.epsilon_high, beta=grpo.beta,
        aggregation=grpo.loss_aggregation, max_completion_length=grpo.max_new_tokens, token_count=token_count,
    )


def micro_batch_token_count(batch: Batch, train: TrainArguments) -> float:
    """token-mean's divisor for each micro-batch, so that the update is the mean over every completion token of
    the optimizer step, all ranks and micro-batches (DAPO; TRL's `dapo`), not a mean of per-micro-batch means.

    DeepSpeed averages gradients over the data-parallel ranks and divides each micro-batch's loss by
    gradient_accumulation_steps, so a micro-batch's sum is divided by the step's tokens / (ranks × micro-batches):
    the mean over ranks of this rank's tokens, over the micro-batches. Collective: every rank calls it.
    """
    return all_mean([float(batch.completion_mask.sum())])[0] / train.gradient_accumulation_steps


def rollout(policy, tokenizer, source: PromptSource, reward_fn, grpo, train, step: int, replica: int, replicas: int,
            device: torch.device, guard: PreemptionGuard) -> Batch:
    """Sample prompts for this data-parallel replica and step, G completions each, their rewards and advantages.

    Every rank of a sequence-parallel group is the same replica: same prompts, same seed, and the completions of
    the group's first rank (so that they cannot drift apart). Raises :class:`Preempted` on every rank when a stop
    is requested during generation."""
    per_rank = train.prompts_per_device * train.gradient_accumulation_steps
    examples = [source.example(i) for i in batch_indices(step, replica, replicas, per_rank)]
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [e.prompt for e in examples], device)
    generator = torch.Generator().manual_seed(hash((train.seed, step, replica)) % 2**63)
    module = policy.module
    was_training = module.training
    module.eval()
    with gathered_for_generation(policy, grpo.rollout_gather):
        out = generate(
            guard.interruptible(module), prompt_ids, prompt_mask, grpo.num_generations,
            max_new_tokens=grpo.max_new_tokens, temperature=grpo.temperature, top_p=grpo.top_p,
            eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, generator=generator, cache=grpo.rollout_cache,
            prefill_chunk=grpo.rollout_prefill_chunk,
        )
    module.train(was_training)
    if train.sequence_parallel_size > 1:
        out.completion_ids, out.completion_mask = broadcast_from_first(
            [out.completion_ids, out.completion_mask], policy.get_sequence_parallel_group())
    G = grpo.num_generations
    texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    rewards = compute_rewards(
        reward_fn, [e.prompt for e in examples for _ in range(G)], texts, [e.answer for e in examples for _ in range(G)]
    )
    rewards = torch.tensor(rewards, dtype=torch.float32, device=device)
    sizes = torch.full((len(examples),), G, dtype=torch.long, device=device)
    return Batch(prompt_ids, prompt_mask, out.completion_ids, out.completion_mask, rewards,
                 group_advantages(rewards, sizes, grpo.advantage), cache_bytes=out.cache_bytes)


@torch.no_grad()
def fill_fixed_logprobs(batch: Batch, policy, reference, grpo: GRPOArguments, train: TrainArguments) -> None:
    """Old-policy log-probs (only needed when updating more than once) and reference log-probs (beta > 0)."""
    G, prompts, chunks = grpo.num_generations, train.prompts_per_device, train.gradient_accumulation_steps
    parts = [batch.micro_batch(i, prompts, G) for i in range(chunks)]
    if grpo.num_iterations > 1:
        batch.old_logps = torch.cat([sequence_logprobs(policy, p, grpo) for p in parts])
    if reference is not None:
        batch.ref_logps = torch.cat([sequence_logprobs(reference, p, grpo) for p in parts])  # the engine: see logprobs


def update(policy, batch: Batch, grpo: GRPOArguments, train: TrainArguments) -> dict:
    """num_iterations passes over the batch's micro-batches; DeepSpeed steps at each accumulation boundary."""
    totals = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0}
    count = 0
    token_count = micro_batch_token_count(batch, train)
    for _ in range(grpo.num_iterations):
        for i in range(train.gradient_accumulation_steps):
            part = batch.micro_batch(i, train.prompts_per_device, grpo.num_generations)
            loss, stats = policy_loss(policy, part, grpo, token_count)
            policy.backward(loss)
            policy.step()
            totals["loss"] += loss.item()
            totals["kl"] += stats["kl"]
            totals["clip_frac"] += stats["clip_frac"]
            count += 1
    return {k: v / count for k, v in totals.items()}


def sft_warmup(policy, tokenizer, source: PromptSource, grpo: GRPOArguments, train: TrainArguments, replica: int,
               replicas: int, device: torch.device, first: int, stop: Callable[[], bool]) -> int:
    """Supervised steps ``first``.. on `answer + EOS` (negative mean log-prob), on prompts the GRPO steps never see.

    Polls ``stop()`` after each step; returns the number of warm-up steps done (all of them unless stopped)."""
    eos = tokenizer.eos_token_id
    for step in range(first, train.sft_warmup_steps):
        for i in range(train.gradient_accumulation_steps):
            indices = batch_indices(step * train.gradient_accumulation_steps + i, replica, replicas,
                                    train.prompts_per_device)
            examples = [source.example(SFT_OFFSET + j) for j in indices]
            prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [e.prompt for e in examples], device)
            answers = [tokenizer(e.answer, add_special_tokens=False)["input_ids"] + [eos] for e in examples]
            width = max(len(a) for a in answers)
            ids = torch.full((len(answers), width), tokenizer.pad_token_id, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for r, a in enumerate(answers):
                ids[r, : len(a)], mask[r, : len(a)] = torch.tensor(a, device=device), 1
            logps = completion_logprobs(policy, prompt_ids, prompt_mask, ids, mask, 1,
                                        chunk_size=grpo.logprob_chunk_size)
            policy.backward(-(logps * mask).sum() / mask.sum())
            policy.step()
        if stop():
            return step + 1
    return train.sft_warmup_steps


@dataclass
class Plan:
    """What the cheap set-up checks established; :func:`run` builds and trains from it."""

    model_args: ModelArguments
    data_args: DataArguments
    grpo: GRPOArguments
    train: TrainArguments
    tokenizer: PreTrainedTokenizerBase
    config: PretrainedConfig
    source: PromptSource
    reward_fn: Callable
    ds_config: dict
    max_length: int  # the longest prompt + max_new_tokens: the patch accepts windows at least this long


def _tag(step: int, sft_step: int | None) -> str:
    return f"step {step}" if sft_step is None else f"warm-up step {sft_step}"


def prepare(model_args: ModelArguments, data_args: DataArguments, grpo: GRPOArguments,
            train: TrainArguments) -> Plan:
    """Every check that needs no process group and no weights. Raises ValueError, TypeError, OSError or
    ImportError naming the culprit; `launch/train.py` prints those as one line."""
    curriculum = curriculum_of(data_args, train.max_steps)
    if train.sft_warmup_steps is None:  # unset: a supervised start on the curriculum's shortest prompts
        train = replace(train, sft_warmup_steps=DEFAULT_SFT_WARMUP_STEPS if curriculum is not None else 0)
    check_args(model_args, data_args, grpo, train)
    tokenizer = load_tokenizer(model_args.model)
    config = load_config(model_args.model)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_sequence_parallel_size(train.sequence_parallel_size, world, config, option="--sequence_parallel_size")
    replicas = world // train.sequence_parallel_size
    source = build_source(data_args.task, data_args.dataset, data_args.prompt_length, train.seed, curriculum,
                          examples_per_step=replicas * train.prompts_per_device * train.gradient_accumulation_steps)
    max_length = check_prompt_lengths(tokenizer, source, config, grpo.max_new_tokens)
    check_patchable(config, max_length)
    reward_fn = resolve_reward_fn(grpo.reward_fn, synthetic=data_args.dataset is None, format_reward=grpo.format_reward)
    ds_config = load_ds_config(
        train.ds_config, micro_batch_size=train.prompts_per_device,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        world_size=world, hidden_size=config.hidden_size, dtype=model_args.dtype,
        lr=train.learning_rate, weight_decay=train.weight_decay, warmup_steps=train.warmup_steps,
        total_steps=train.sft_warmup_steps + train.max_steps * grpo.num_iterations,
        sequence_parallel_size=train.sequence_parallel_size,
    )
    try:
        gradient_scale(ds_config, train.sequence_parallel_size)
    except ValueError as error:
        raise ValueError(f"--sequence_parallel_size {train.sequence_parallel_size}: {error}") from None
    return Plan(model_args, data_args, grpo, train, tokenizer, config, source, reward_fn, ds_config, max_length)


def train(model_args: ModelArguments, data_args: DataArguments, grpo: GRPOArguments, train: TrainArguments) -> None:
    """Check, build, train, checkpoint and export: :func:`prepare` then :func:`run`."""
    run(prepare(model_args, data_args, grpo, train))


def run(plan: Plan) -> None:
    model_args, grpo, train, tokenizer, source = plan.model_args, plan.grpo, plan.train, plan.tokenizer, plan.source
    # ---------------------------------------------------------------- set-up
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    sp = train.sequence_parallel_size
    replica, replicas = rank // sp, world // sp  # a sequence-parallel group is one data-parallel replica
    device = torch.device(deepspeed.get_accelerator().current_device_name())
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one node share its cores; oversubscribed threads stall every collective
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_SIZE", "1"))))
    deepspeed.runtime.utils.set_random_seed(train.seed)
    dtype = DTYPES[dtype_name(model_args.dtype)]
    policy = init_policy(build_model(model_args.model, plan.ds_config, dtype=dtype, max_length=plan.max_length,
                                     gradient_checkpointing=model_args.gradient_checkpointing), plan.ds_config,
                         sequence_parallel_size=sp)
    reference = None
    if grpo.beta > 0:
        deepspeed.runtime.utils.set_random_seed(train.seed)  # a preset's reference gets the policy's initial weights
        reference = init_reference(model_args.model, plan.ds_config, dtype=dtype, max_length=plan.max_length,
                                   sequence_parallel_size=sp)
    for engine in (policy, reference):
        if engine is not None:
            patch_model(engine, backend=model_args.attention_backend, max_length=plan.max_length)
    guard = PreemptionGuard()
    state = load_checkpoint(policy, train.output_dir) if train.resume else None
    start, sft_done, saved = 0, 0, None  # saved: the newest complete checkpoint, as (step, sft_step)
    if state is not None:
        start, saved = state["step"], (state["step"], state.get("sft_step"))
        sft_done = train.sft_warmup_steps if saved[1] is None else saved[1]
        if rank == 0:
            print(f"[pg_deepspeed] resumed from {_tag(*saved)} in {train.output_dir}", flush=True)
    nodes = [0] * world
    dist.all_gather_object(nodes, node_rank())
    logger = MetricsLogger(train.output_dir, rank=rank, total_steps=train.max_steps, start_step=start)

    def save(step: int, sft_step: int | None = None, rng_state: dict | None = None) -> None:
        nonlocal saved
        if saved != (step, sft_step):  # never over the newest complete checkpoint (a resume that has nothing to do)
            save_checkpoint(policy, train.output_dir, step, {"data_position": step}, sft_step=sft_step,
                            total_limit=train.save_total_limit, rng_state=rng_state)
            saved = (step, sft_step)

    def stop(step: int, sft_step: int | None = None, rng_state: dict | None = None, during: str = "") -> None:
        save(step, sft_step, rng_state)
        if rank == 0:
            print(f"[pg_deepspeed] stop requested{during}: checkpoint at {_tag(step, sft_step)}, requeueing",
                  flush=True)
        logger.close()
        guard.requeue()

    if sft_done < train.sft_warmup_steps:
        sft_done = sft_warmup(policy, tokenizer, source, grpo, train, replica, replicas, device, sft_done,
                              guard.stop_requested)
        if guard.stop_requested():  # during the warm-up: save its progress (all of it: GRPO step 0)
            return stop(0, sft_done if sft_done < train.sft_warmup_steps else None)

    # ---------------------------------------------------------------- the loop
    logprob_passes = grpo.num_iterations + (grpo.num_iterations > 1) + (grpo.beta > 0)
    step = start
    while step < train.max_steps:
        t0 = time.perf_counter()
        at_boundary = current_rng_state()
        try:
            with PeakMemory(device) as rollout_peak:
                batch = rollout(policy, tokenizer, source, plan.reward_fn, grpo, train, step, replica, replicas,
                                device, guard)
        except Preempted:
            return stop(step, rng_state=at_boundary, during=f" during the rollout of step {step + 1}")
        t_rollout = time.perf_counter() - t0
        generated = float(batch.completion_mask.sum())
        fill_fixed_logprobs(batch, policy, reference, grpo, train)
        stats = update(policy, batch, grpo, train)
        step += 1

        all_rewards = all_gather_cat(batch.rewards).view(world, -1)[::sp].flatten()  # one copy per replica
        G = grpo.num_generations
        skipped = float(((G - 1) * batch.prompt_mask.sum()).item()) * (0 if grpo.no_prefix_grouping else 1)
        tokens = float(batch.prompt_mask.sum() + batch.completion_mask.sum())
        elapsed = time.perf_counter() - t0
        rollout_tokens_per_s = generated / t_rollout
        (loss, kl, clip_frac, skipped, tokens, prompt_len, completion_len, elapsed, t_rollout, rollout_tokens_per_s,
         peak, kv) = all_mean(
            [stats["loss"], stats["kl"], stats["clip_frac"], skipped, tokens,
             float(batch.prompt_mask.sum(1).float().mean()), float(batch.completion_mask.sum(1).float().mean()),
             elapsed, t_rollout, rollout_tokens_per_s, float(rollout_peak.bytes), float(batch.cache_bytes)])
        logger.log({
            "step": step, "reward_mean": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
            "accuracy": (all_rewards == 1.0).float().mean().item(), "loss": loss, "kl": kl, "clip_frac": clip_frac,
            "prompt_length": prompt_len, "completion_length": completion_len,
            "tokens_per_s": tokens * replicas / elapsed,
            "prefix_tokens_saved": int(skipped * replicas * logprob_passes),
            "step_time_s": elapsed, "rollout_time_s": t_rollout,
            # generated tokens per second of rollout, all replicas; per-rank means of the rollout's peak memory
            # (PeakMemory: CUDA allocated, or CPU peak RSS, above the start) and of its decode cache's K/V bytes
            "rollout_tokens_per_s": rollout_tokens_per_s * replicas, "rollout_peak_mem_bytes": int(peak),
            "rollout_cache_bytes": int(kv), "lr": policy.get_lr()[0], "world_size": world,
            "sequence_parallel_size": sp,
            "node_ranks": nodes,
        })
        if train.save_steps and step % train.save_steps == 0:
            save(step)
        if guard.stop_requested():
            return stop(step)

    # ---------------------------------------------------------------- checkpoint and export
    save(step)
    if train.export:
        export_hf(policy, tokenizer, os.path.join(train.output_dir, "export"))
    logger.close()
