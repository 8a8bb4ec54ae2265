"""The GRPO loop, top to bottom: set up the ranks, build the engines, warm up, then per step roll out, fix the old and
reference log-probs, update, log and checkpoint; at the end save and export.

The set-up checks live in `setup_checks.py` (run before any process group), the per-step work in `steps.py`, saving
and resuming in `checkpointer.py`.
"""
from __future__ import annotations

import math
import os
import time

import deepspeed
import torch
import torch.distributed as dist

from pg_deepspeed.collectives import all_gather_cat, all_mean, shutdown
from pg_deepspeed.distributed.checkpoint import current_rng_state
from pg_deepspeed.distributed.ds_config import DTYPES, dtype_name
from pg_deepspeed.distributed.engines import build_model, init_policy, init_reference
from pg_deepspeed.distributed.export import export_hf
from pg_deepspeed.distributed.parallel_dims import ParallelDims, ranks_per_node
from pg_deepspeed.distributed.peak_memory import PeakMemory
from pg_deepspeed.grpo.args import DataArguments, GRPOArguments, ModelArguments, TrainArguments
from pg_deepspeed.grpo.checkpointer import Checkpointer
from pg_deepspeed.grpo.evaluation import evaluate
from pg_deepspeed.grpo.metrics import MetricsLogger
from pg_deepspeed.grpo.multiturn import rollout_conversations
from pg_deepspeed.grpo.nonfinite import NonFiniteGuard
from pg_deepspeed.grpo.preemption import Preempted, PreemptionGuard, node_rank
from pg_deepspeed.grpo.setup_checks import TrainingSetup, prepare
from pg_deepspeed.grpo.steps import Batch, fill_fixed_logprobs, prefix_tokens_saved, rollout, sft_warmup, update
from pg_deepspeed.grpo.vllm_rollout import VLLMRollout, truncated_importance_weights


def train(model_args: ModelArguments, data_args: DataArguments, grpo: GRPOArguments, train: TrainArguments) -> None:
    """Check, build, train, checkpoint and export: :func:`prepare` then :func:`run`."""
    run(prepare(model_args, data_args, grpo, train))


def run(setup: TrainingSetup) -> None:
    """Train on this rank: the process group's life around :func:`train_loop`."""
    rank, device = init_ranks(setup)
    train_loop(setup, rank, device)
    shutdown()  # reached after a preemption stop too; after an error the traceback ends the rank instead


def train_loop(setup: TrainingSetup, rank: int, device: torch.device) -> None:
    grpo, train, dims = setup.grpo, setup.train, setup.dims
    policy, reference = build_engines(setup)
    vllm = VLLMRollout.start(setup, device) if grpo.rollout_engine == "vllm" else None
    guard = PreemptionGuard()
    nonfinite = NonFiniteGuard(train.max_nonfinite_steps, fp16=dtype_name(setup.model_args.dtype) == "float16")
    checkpointer = Checkpointer(policy, train, rank, guard)
    start = checkpointer.resume()
    logger = MetricsLogger(train.output_dir, rank=rank, total_steps=train.max_steps, start_step=start.step,
                           report_to=tuple(train.report_to), project=train.wandb_project, config=setup.options())
    nodes = [0] * dims.world
    dist.all_gather_object(nodes, node_rank())

    if start.sft_done < train.sft_warmup_steps:
        done = sft_warmup(policy, setup.prompt_format, setup.source, grpo, train, dims, rank, device, start.sft_done,
                          guard.stop_requested, nonfinite)
        if guard.stop_requested():  # during the warm-up: save its progress (all of it: GRPO step 0)
            logger.close()
            return checkpointer.stop(0, done if done < train.sft_warmup_steps else None)
    if start.step == 0 and setup.eval_set is not None:  # the held-out score before any GRPO step
        logger.log({"step": 0, **evaluate(policy, setup.prompt_format, setup.eval_set, setup.rewards, grpo, train,
                                          dims, rank, device, step=0, vllm=vllm,
                                          conversations=setup.conversations)})

    for step in range(start.step + 1, train.max_steps + 1):
        t0, at_boundary = time.perf_counter(), current_rng_state()
        synced = vllm.refresh(policy) if vllm is not None else {}  # the weights the update left, into the engine
        t_sync = time.perf_counter() - t0
        try:
            with PeakMemory(device) as rollout_peak:
                batch = roll_out(setup, policy, step - 1, rank, device, guard, vllm)
        except Preempted:
            logger.close()
            return checkpointer.stop(step - 1, rng_state=at_boundary, during=f" during the rollout of step {step}")
        t_rollout = time.perf_counter() - t0 - t_sync
        slept = vllm.sleep() if vllm is not None else {}  # its device memory to the update (--vllm_sleep)
        fill_fixed_logprobs(batch, policy, reference, grpo, train)
        fresh = {} if vllm is None else vllm.check_fresh(batch.old_logps, batch.rollout_logps, batch.trained_mask,
                                                         f"step {step}")
        if grpo.rollout_importance_correction:
            batch.token_weights, importance = truncated_importance_weights(
                batch.old_logps, batch.rollout_logps, batch.trained_mask, grpo.rollout_importance_cap)
            fresh.update(importance)
        lr = policy.get_lr()[0]  # the rate this step's (first) optimizer step uses; get_lr() after it is the next's
        stats = update(policy, batch, grpo, train, nonfinite, step)
        timings = {"step_time_s": time.perf_counter() - t0, "rollout_time_s": t_rollout,
                   "rollout_peak_mem_bytes": float(rollout_peak.bytes), **synced, **slept}
        logger.log({"step": step, **step_metrics(batch, stats, timings, setup), **fresh,
                    **evaluation_at(step, setup, policy, rank, device, vllm), "lr": lr,
                    "world_size": dims.world, "sequence_parallel_size": dims.sp, "node_ranks": nodes})
        if train.log_completions_steps and step % train.log_completions_steps == 0:
            logger.log_completions(step, replica_samples(batch, dims))
        checkpointer.after_step(step)
        if guard.stop_requested():
            logger.close()
            return checkpointer.stop(step)

    checkpointer.save(max(start.step, train.max_steps))  # a resume with nothing left to do writes nothing again
    if train.export:
        export_hf(policy, setup.tokenizer, os.path.join(train.output_dir, "export"))
    logger.close()


def roll_out(setup: TrainingSetup, policy, step: int, rank: int, device: torch.device, guard: PreemptionGuard,
             vllm: VLLMRollout | None) -> Batch:
    """This rank's rollout batch of `step`: one completion per sample, or multi-turn conversations (--environment)."""
    if setup.environment is not None:
        return rollout_conversations(policy, setup.chat_turns, setup.environment, setup.source, setup.rewards,
                                     setup.multiturn, setup.grpo, setup.train, step, setup.dims, rank, device, guard,
                                     vllm)
    return rollout(policy, setup.prompt_format, setup.source, setup.rewards, setup.grpo, setup.train, step, setup.dims,
                   rank, device, guard, vllm)


def init_ranks(setup: TrainingSetup) -> tuple[int, torch.device]:
    """The process group, this rank's device, CPU threads and the seed; returns (rank, device)."""
    deepspeed.init_distributed()
    if dist.get_world_size() != setup.dims.world:
        raise RuntimeError(f"the run was checked for {setup.dims.world} ranks (WORLD_SIZE) but has "
                           f"{dist.get_world_size()}")
    device = torch.device(deepspeed.get_accelerator().current_device_name())
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one node share its cores; oversubscribed threads stall every collective
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_per_node(1)))
    deepspeed.runtime.utils.set_random_seed(setup.train.seed)
    return dist.get_rank(), device


def build_engines(setup: TrainingSetup):
    """The policy engine and, when --beta > 0, the frozen reference engine (else None), both patched."""
    model_args, train = setup.model_args, setup.train
    dtype = DTYPES[dtype_name(model_args.dtype)]
    options = dict(dtype=dtype, max_length=setup.max_length, attention_backend=model_args.attention_backend)
    model = build_model(model_args.model, setup.ds_config, gradient_checkpointing=model_args.gradient_checkpointing,
                        **options)
    policy = init_policy(model, setup.ds_config, dims=setup.dims)
    if setup.grpo.beta == 0:
        return policy, None
    deepspeed.runtime.utils.set_random_seed(train.seed)  # a preset's reference gets the policy's initial weights
    return policy, init_reference(model_args.model, setup.ds_config, dims=setup.dims, **options)


def evaluation_at(step: int, setup: TrainingSetup, policy, rank: int, device: torch.device,
                  vllm: VLLMRollout | None = None) -> dict:
    """The held-out metrics when `step` is an evaluation step (every --eval_steps, and the last), else {}."""
    every, last = setup.train.eval_steps, step == setup.train.max_steps
    if setup.eval_set is None or not (last or (every and step % every == 0)):
        return {}
    return evaluate(policy, setup.prompt_format, setup.eval_set, setup.rewards, setup.grpo, setup.train, setup.dims,
                    rank, device, step, vllm=vllm, conversations=setup.conversations)


def replica_samples(batch: Batch, dims: ParallelDims) -> list[dict]:
    """Every replica's samples, in replica order, on every rank (one copy per sequence-parallel group). Collective."""
    gathered = [None] * dims.world
    dist.all_gather_object(gathered, batch.samples)
    return [sample for rank_samples in gathered[::dims.sp] for sample in rank_samples]


def step_metrics(batch: Batch, stats: dict, timings: dict, setup: TrainingSetup) -> dict:
    """The step's metrics over all ranks: means by name of the per-rank values, rates and counts over replicas.
    Collective."""
    grpo, dims = setup.grpo, setup.dims
    passes = grpo.num_iterations + (grpo.num_iterations > 1) + (grpo.beta > 0)  # log-prob passes over the batch
    generated = float(batch.completion_mask.sum())
    mean = all_mean({
        **stats, **timings,
        "tokens": float(batch.prompt_mask.sum()) + generated,
        "generated": generated,
        "prefix_tokens_saved": float(prefix_tokens_saved(batch, grpo, setup.train) * passes),
        "prompt_length": float(batch.prompt_mask.sum(1).float().mean()),
        "completion_length": float(batch.completion_mask.sum(1).float().mean()),
        "rollout_cache_bytes": float(batch.cache_bytes),
        **(batch.rollout_metrics or {}),  # multi-turn: turns_mean, tool_calls_mean (the same keys on every rank)
    })
    rewards = all_gather_cat(batch.rewards).view(dims.world, -1)[::dims.sp].flatten()  # one copy per replica
    K = len(setup.rewards.names)
    parts = all_gather_cat(batch.reward_parts).view(dims.world, -1, K)[::dims.sp].reshape(-1, K).T.tolist()
    return {
        "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
        # each reward function's own mean (the reward is their weighted sum); accuracy: see RewardFunctions
        **{f"reward/{name}": math.fsum(part) / len(part) for name, part in zip(setup.rewards.names, parts)},
        "accuracy": setup.rewards.accuracy(parts),
        "loss": mean["loss"], "kl": mean["kl"], "clip_frac": mean["clip_frac"],
        "nonfinite_skips": int(mean["nonfinite_skips"]),  # optimizer steps skipped (the same on every rank)
        "prompt_length": mean["prompt_length"], "completion_length": mean["completion_length"],
        "tokens_per_s": mean["tokens"] * dims.dp / mean["step_time_s"],
        "prefix_tokens_saved": int(mean["prefix_tokens_saved"] * dims.dp),
        "step_time_s": mean["step_time_s"], "rollout_time_s": mean["rollout_time_s"],
        # generated tokens per second of rollout, all replicas; per-rank means of the rollout's peak memory
        # (PeakMemory: CUDA allocated, or CPU peak RSS, above the start) and of its decode cache's K/V bytes
        "rollout_tokens_per_s": mean["generated"] * dims.dp / mean["rollout_time_s"],
        "rollout_peak_mem_bytes": int(mean["rollout_peak_mem_bytes"]),
        "rollout_cache_bytes": int(mean["rollout_cache_bytes"]),
        # --rollout_engine vllm: the weight sync before the rollout (vllm_sync.py), means over ranks
        **{k: mean[k] for k in ("weight_sync_time_s", "weight_sync_peak_mem_bytes", "weight_sync_bytes") if k in mean},
        # --vllm_sleep: device memory the sleeping engine released for the update, mean over ranks
        **({"vllm_sleep_freed_bytes": int(mean["vllm_sleep_freed_bytes"])} if "vllm_sleep_freed_bytes" in mean else {}),
        **{k: mean[k] for k in (batch.rollout_metrics or {})},  # multi-turn: turns_mean, tool_calls_mean
    }
