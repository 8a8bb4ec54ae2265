"""Held-out evaluation: greedy pass@1 and the sampled mean reward on examples the run never trains on.

The held-out set is `--eval_dataset` (its first `--eval_examples` rows when that is set), or `--eval_examples` rows
held out of `--dataset` (the training set never reads them), or for a built-in or reasoning-gym task `--eval_examples`
examples from an index range no training or warm-up step reads (EVAL_OFFSET), at the task's final prompt length. Each
evaluation runs on the policy of that moment, at step 0 (before any GRPO step), every `--eval_steps` and at the end:

- `eval/accuracy`: greedy decoding (temperature 0), the share of examples whose reward reaches its maximum (every
  positively weighted reward function returns 1.0: `RewardFunctions.accuracy`);
- `eval/reward_mean`: one completion per example sampled as the rollout samples (temperature, top-p), its weighted
  reward averaged;
- `eval/reward/<name>`: each reward function's mean over the greedy completions (which part of the task is learnt).

The examples are split over the data-parallel replicas; every rank makes the same number of generate calls (a
replica short of examples repeats one and drops its result), as ZeRO-3's gathers require.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pg_deepspeed.collectives import all_mean
from pg_deepspeed.distributed.parallel_dims import ParallelDims
from pg_deepspeed.grpo.args import DataArguments, GRPOArguments, TrainArguments
from pg_deepspeed.grpo.data import CurriculumTask, Example, FileDataset, PromptSource
from pg_deepspeed.grpo.prompts import PromptFormat
from pg_deepspeed.grpo.rewards import RewardFunctions, row_columns

# built-in and reasoning-gym tasks: held-out examples are indexed from here (training < 2**60 <= warm-up 2**61)
EVAL_OFFSET = 2**60


@dataclass
class EvalSet:
    name: str
    examples: list[Example]


def held_out(data: DataArguments, source: PromptSource, seed: int) -> tuple[PromptSource, EvalSet | None]:
    """(the training source, the held-out set or None) that the options ask for."""
    n = data.eval_examples
    if n < 0:
        raise ValueError(f"--eval_examples must be >= 0, got {n}")
    if data.eval_dataset is not None:
        evaluation = FileDataset(data.eval_dataset, seed, data.answer_column)
        rows = range(min(n, len(evaluation)) if n else len(evaluation))
        return source, EvalSet(f"--eval_dataset {evaluation.name}", [evaluation.at(r) for r in rows])
    if n == 0:
        return source, None
    if isinstance(source, FileDataset):
        source, evaluation = source.hold_out(n)
        return source, EvalSet(f"{n} rows held out of {source.name}", [evaluation.at(r) for r in range(n)])
    task = source.final_task if isinstance(source, CurriculumTask) else source
    return source, EvalSet(f"{n} held-out examples of {task.name}", [task.example(EVAL_OFFSET + i) for i in range(n)])


def evaluate(policy, prompt_format: PromptFormat, eval_set: EvalSet, rewards: RewardFunctions, grpo: GRPOArguments,
             train: TrainArguments, dims: ParallelDims, rank: int, device: torch.device, step: int,
             vllm=None, conversations=None) -> dict:
    """{"eval/accuracy", "eval/reward_mean"} over the whole held-out set, the same on every rank. Collective.
    vllm: the run's VLLMRollout (--rollout_engine vllm), which then samples, or None. conversations: a multi-turn
    run's `multiturn.Conversations` (--environment): each example is then one unbranched conversation with the
    environment, scored by the run's rewards (the environment's among them)."""
    from pg_deepspeed.grpo.steps import gathered_once, sample  # the rollout's sampling, one piece of code

    replica, per = dims.replica(rank), train.per_device_eval_batch_size or train.prompts_per_device
    mine = eval_set.examples[replica::dims.dp]
    calls = math.ceil(math.ceil(len(eval_set.examples) / dims.dp) / per)
    tokenizer = prompt_format.tokenizer
    correct, reward_sum = 0.0, 0.0
    greedy_sums = dict.fromkeys(rewards.names, 0.0)  # each function's greedy mean: which part of the task is learnt
    with gathered_once(policy, grpo, vllm) as inner:  # the weights gathered once, not twice per batch
        for call in range(calls):
            chunk = mine[call * per:(call + 1) * per]
            real = len(chunk)
            chunk = chunk or eval_set.examples[:1]  # an idle call: the generate calls are collectives
            # a conversation's prompt is what its environment's reset says
            prompt_ids, prompt_mask = (prompt_format.batch([e.prompt for e in chunk], device)
                                       if conversations is None else (None, None))
            prompts, answers = [e.prompt for e in chunk], [e.answer for e in chunk]
            columns = row_columns([e.columns for e in chunk], 1)
            # ints only: a str's hash differs between processes (PYTHONHASHSEED), an int tuple's does not
            seed = hash((train.seed, EVAL_OFFSET, step, replica, call)) % 2**63
            generator = torch.Generator().manual_seed(seed)
            for temperature in (0.0, grpo.temperature):
                if conversations is not None:
                    total, parts = conversations.score(policy, chunk, rewards, inner, temperature, dims, device,
                                                       generator, seed, vllm)
                else:
                    out = sample(policy, prompt_ids, prompt_mask, 1, inner, tokenizer, generator, temperature, dims,
                                 vllm=vllm, seed=seed)
                    texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
                    total, parts = rewards.score(prompts, texts, answers, columns)
                if temperature == 0.0:
                    correct += sum(rewards.accuracy([[part[i]] for part in parts]) for i in range(real))
                    for name, part in zip(rewards.names, parts):
                        greedy_sums[name] += math.fsum(part[:real])
                else:
                    reward_sum += math.fsum(total[:real])
    # one copy per replica: the other ranks of a sequence-parallel group hold the same examples (ratios of the means
    # over ranks are ratios of the sums)
    mine_count = 0.0 if rank % dims.sp else float(len(mine))
    sums = {"correct": correct, "reward": reward_sum, **{f"eval/reward/{n}": v for n, v in greedy_sums.items()}}
    means = all_mean({**{k: v if mine_count else 0.0 for k, v in sums.items()}, "count": mine_count})
    count = means.pop("count")
    return {"eval/accuracy": means.pop("correct") / count, "eval/reward_mean": means.pop("reward") / count,
            **{k: v / count for k, v in means.items()}}
