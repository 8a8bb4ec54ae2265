"""The GRPO loop, top to bottom: set-up, then per step rollout, reward, advantage, update, log, checkpoint.

Every log-prob forward (policy, old policy, reference) goes through `completion_logprobs`, prefix-grouped
unless `--no_prefix_grouping`. Batch terms: a micro-batch is `prompts_per_device` prompts (groups) with
their G completions each; a step samples `prompts_per_device * gradient_accumulation_steps` prompts per
rank and makes `num_iterations` optimizer updates on them.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist

from ..attention import BACKENDS
from ..ds_config import load_ds_config
from ..engine import (
    build_model, export_hf, init_policy, init_reference, load_checkpoint, load_config, load_tokenizer, save_checkpoint,
)
from ..logprobs import completion_logprobs
from ..patch import patch_model
from .advantages import ESTIMATORS, group_advantages
from .args import DataArguments, GRPOArguments, ModelArguments, TrainArguments
from .collective import all_gather_cat, all_mean
from .data import PromptSource, batch_indices, build_source, longest_prompt, tokenize_prompts
from .loss import AGGREGATIONS, grpo_loss
from .metrics import MetricsLogger
from .preemption import PreemptionGuard, node_rank
from .rewards import compute_rewards, resolve_reward_fn
from .rollout import generate

SFT_OFFSET = 2**61  # SFT prompts are indexed far from the GRPO ones
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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

    def micro_batch(self, i: int, prompts: int, G: int) -> "Batch":
        p, c = slice(i * prompts, (i + 1) * prompts), slice(i * prompts * G, (i + 1) * prompts * G)
        take = lambda x: None if x is None else x[c]
        return Batch(self.prompt_ids[p], self.prompt_mask[p], self.completion_ids[c], self.completion_mask[c],
                     self.rewards[c], self.advantages[c], take(self.old_logps), take(self.ref_logps))


def check_args(model: ModelArguments, data: DataArguments, grpo: GRPOArguments, train: TrainArguments) -> None:
    """Refuse contradictory or impossible settings before any heavy work."""
    if not os.path.isfile(train.ds_config):
        raise FileNotFoundError(f"--ds_config {train.ds_config!r} does not exist")
    if model.attention_backend not in ("auto", *BACKENDS):
        raise ValueError(f"--attention_backend must be one of {['auto', *BACKENDS]}, got {model.attention_backend!r}")
    if model.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {model.dtype!r}")
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
    if not 0.0 < grpo.top_p <= 1.0:
        raise ValueError(f"--top_p must be in (0, 1], got {grpo.top_p}")
    if grpo.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {grpo.temperature}")
    if grpo.beta < 0:
        raise ValueError(f"--beta must be >= 0, got {grpo.beta}")


def check_prompt_lengths(tokenizer, source: PromptSource, config, max_new_tokens: int) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    longest, index = longest_prompt(tokenizer, source)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(
            f"prompt {index} of {source.name} is {longest} tokens; with --max_new_tokens {max_new_tokens} it exceeds "
            f"the model's max_position_embeddings ({limit})"
        )


def sequence_logprobs(model, batch: Batch, grpo: GRPOArguments) -> torch.Tensor:
    """[N, Lc] log-probs of the batch's completions, prefix-grouped unless --no_prefix_grouping."""
    return completion_logprobs(
        model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, grpo.num_generations,
        temperature=grpo.temperature, prefix_grouping=not grpo.no_prefix_grouping,
    )


def policy_loss(model, batch: Batch, grpo: GRPOArguments) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of one micro-batch (differentiable w.r.t. the policy's parameters)."""
    logps = sequence_logprobs(model, batch, grpo)
    old = batch.old_logps if batch.old_logps is not None else logps.detach()
    return grpo_loss(
        logps, old, batch.ref_logps, batch.advantages, batch.completion_mask,
        epsilon=grpo.epsilon, epsilon_high=grpo.epsilon_high, beta=grpo.beta,
        aggregation=grpo.loss_aggregation, max_completion_length=grpo.max_new_tokens,
    )


def rollout(policy, tokenizer, source: PromptSource, reward_fn, grpo, train, step: int, rank: int, world: int,
            device: torch.device) -> Batch:
    """Sample prompts for this rank and step, G completions each, their rewards and advantages."""
    per_rank = train.prompts_per_device * train.gradient_accumulation_steps
    examples = [source.example(i) for i in batch_indices(step, rank, world, per_rank)]
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [e.prompt for e in examples], device)
    generator = torch.Generator().manual_seed(hash((train.seed, step, rank)) % 2**63)
    module = policy.module
    was_training = module.training
    module.eval()
    out = generate(
        module, prompt_ids, prompt_mask, grpo.num_generations, max_new_tokens=grpo.max_new_tokens,
        temperature=grpo.temperature, top_p=grpo.top_p, eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id, generator=generator,
    )
    module.train(was_training)
    G = grpo.num_generations
    texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    rewards = compute_rewards(
        reward_fn, [e.prompt for e in examples for _ in range(G)], texts, [e.answer for e in examples for _ in range(G)]
    )
    rewards = torch.tensor(rewards, dtype=torch.float32, device=device)
    sizes = torch.full((len(examples),), G, dtype=torch.long, device=device)
    return Batch(prompt_ids, prompt_mask, out.completion_ids, out.completion_mask, rewards,
                 group_advantages(rewards, sizes, grpo.advantage))


@torch.no_grad()
def fill_fixed_logprobs(batch: Batch, policy, reference, grpo: GRPOArguments, train: TrainArguments) -> None:
    """Old-policy log-probs (only needed when updating more than once) and reference log-probs (beta > 0)."""
    G, prompts, chunks = grpo.num_generations, train.prompts_per_device, train.gradient_accumulation_steps
    parts = [batch.micro_batch(i, prompts, G) for i in range(chunks)]
    if grpo.num_iterations > 1:
        batch.old_logps = torch.cat([sequence_logprobs(policy.module, p, grpo) for p in parts])
    if reference is not None:
        batch.ref_logps = torch.cat([sequence_logprobs(reference, p, grpo) for p in parts])  # the engine: see logprobs


def update(policy, batch: Batch, grpo: GRPOArguments, train: TrainArguments) -> dict:
    """num_iterations passes over the batch's micro-batches; DeepSpeed steps at each accumulation boundary."""
    totals = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0}
    count = 0
    for _ in range(grpo.num_iterations):
        for i in range(train.gradient_accumulation_steps):
            part = batch.micro_batch(i, train.prompts_per_device, grpo.num_generations)
            loss, stats = policy_loss(policy.module, part, grpo)
            policy.backward(loss)
            policy.step()
            totals["loss"] += loss.item()
            totals["kl"] += stats["kl"]
            totals["clip_frac"] += stats["clip_frac"]
            count += 1
    return {k: v / count for k, v in totals.items()}


def sft_warmup(policy, tokenizer, source: PromptSource, train: TrainArguments, rank: int, world: int,
               device: torch.device) -> None:
    """Supervised steps on `answer + EOS` (negative mean log-prob), on prompts the GRPO steps never see."""
    eos = tokenizer.eos_token_id
    for step in range(train.sft_warmup_steps):
        for i in range(train.gradient_accumulation_steps):
            indices = batch_indices(step * train.gradient_accumulation_steps + i, rank, world, train.prompts_per_device)
            examples = [source.example(SFT_OFFSET + j) for j in indices]
            prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [e.prompt for e in examples], device)
            answers = [tokenizer(e.answer, add_special_tokens=False)["input_ids"] + [eos] for e in examples]
            width = max(len(a) for a in answers)
            ids = torch.full((len(answers), width), tokenizer.pad_token_id, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for r, a in enumerate(answers):
                ids[r, : len(a)], mask[r, : len(a)] = torch.tensor(a, device=device), 1
            logps = completion_logprobs(policy.module, prompt_ids, prompt_mask, ids, mask, 1)
            policy.backward(-(logps * mask).sum() / mask.sum())
            policy.step()


def train(model_args: ModelArguments, data_args: DataArguments, grpo: GRPOArguments, train: TrainArguments) -> None:
    # ---------------------------------------------------------------- set-up: cheap checks first
    check_args(model_args, data_args, grpo, train)
    tokenizer = load_tokenizer(model_args.model)
    config = load_config(model_args.model)
    source = build_source(data_args.task, data_args.dataset, data_args.prompt_length, train.seed)
    check_prompt_lengths(tokenizer, source, config, grpo.max_new_tokens)
    reward_fn = resolve_reward_fn(grpo.reward_fn, synthetic=data_args.dataset is None, format_reward=grpo.format_reward)

    ds_config = load_ds_config(
        train.ds_config, micro_batch_size=train.prompts_per_device,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        world_size=int(os.environ.get("WORLD_SIZE", "1")), hidden_size=config.hidden_size, dtype=model_args.dtype,
        lr=train.learning_rate, weight_decay=train.weight_decay, warmup_steps=train.warmup_steps,
        total_steps=train.sft_warmup_steps + train.max_steps * grpo.num_iterations,
    )

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(deepspeed.get_accelerator().current_device_name())
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one node share its cores; oversubscribed threads stall every collective
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_SIZE", "1"))))
    deepspeed.runtime.utils.set_random_seed(train.seed)
    dtype = DTYPES[model_args.dtype]
    policy = init_policy(build_model(model_args.model, ds_config, dtype=dtype,
                                     gradient_checkpointing=model_args.gradient_checkpointing), ds_config)
    reference = None
    if grpo.beta > 0:
        deepspeed.runtime.utils.set_random_seed(train.seed)  # a preset's reference gets the policy's initial weights
        reference = init_reference(model_args.model, ds_config, dtype=dtype)
    for engine in (policy, reference):
        if engine is not None:
            patch_model(engine, backend=model_args.attention_backend)
    state = load_checkpoint(policy, train.output_dir) if train.resume else None
    start = state["step"] if state else 0
    if rank == 0 and state:
        print(f"[pg_deepspeed] resumed from step {start} in {train.output_dir}", flush=True)
    guard = PreemptionGuard()
    nodes = [0] * world
    dist.all_gather_object(nodes, node_rank())
    logger = MetricsLogger(train.output_dir, rank=rank, total_steps=train.max_steps, start_step=start)
    if state is None and train.sft_warmup_steps:
        sft_warmup(policy, tokenizer, source, train, rank, world, device)

    # ---------------------------------------------------------------- the loop
    logprob_passes = grpo.num_iterations + (grpo.num_iterations > 1) + (grpo.beta > 0)
    step = start
    while step < train.max_steps:
        t0 = time.perf_counter()
        batch = rollout(policy, tokenizer, source, reward_fn, grpo, train, step, rank, world, device)
        t_rollout = time.perf_counter() - t0
        fill_fixed_logprobs(batch, policy, reference, grpo, train)
        stats = update(policy, batch, grpo, train)
        step += 1

        all_rewards = all_gather_cat(batch.rewards)
        G = grpo.num_generations
        saved = float(((G - 1) * batch.prompt_mask.sum()).item()) * (0 if grpo.no_prefix_grouping else 1)
        tokens = float(batch.prompt_mask.sum() + batch.completion_mask.sum())
        elapsed = time.perf_counter() - t0
        loss, kl, clip_frac, saved, tokens, completion_len, elapsed, t_rollout = all_mean(
            [stats["loss"], stats["kl"], stats["clip_frac"], saved, tokens,
             float(batch.completion_mask.sum(1).float().mean()), elapsed, t_rollout])
        logger.log({
            "step": step, "reward_mean": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
            "accuracy": (all_rewards == 1.0).float().mean().item(), "loss": loss, "kl": kl, "clip_frac": clip_frac,
            "completion_length": completion_len, "tokens_per_s": tokens * world / elapsed,
            "prefix_tokens_saved": int(saved * world * logprob_passes),
            "step_time_s": elapsed, "rollout_time_s": t_rollout, "lr": policy.get_lr()[0], "world_size": world, "node_ranks": nodes,
        })

        if train.save_steps and step % train.save_steps == 0:
            save_checkpoint(policy, train.output_dir, step, {"data_position": step})
        if guard.stop_requested():
            if not (train.save_steps and step % train.save_steps == 0):
                save_checkpoint(policy, train.output_dir, step, {"data_position": step})
            if rank == 0:
                print(f"[pg_deepspeed] preempted: checkpoint at step {step}, requeueing", flush=True)
            logger.close()
            guard.requeue()
            return

    # ---------------------------------------------------------------- checkpoint and export
    if not (train.save_steps and step % train.save_steps == 0):
        save_checkpoint(policy, train.output_dir, step, {"data_position": step})
    if train.export:
        export_hf(policy, tokenizer, os.path.join(train.output_dir, "export"))
    logger.close()
