"""token-mean across micro-batches and ranks, through the trainer's `update` on two ZeRO-3 ranks (real launcher).

    deepspeed --num_gpus 2 tests/dist/token_mean.py --out DIR     # rank 0 writes DIR/token_mean.json

Each rank holds two micro-batches whose completions differ in length (one short, one long), so a mean of
per-micro-batch means weighs tokens unequally. With SGD (lr = LR, no clipping, no decay) the update is
-LR × DeepSpeed's averaged gradient; rank 0 compares it with -LR × the gradient of ONE token-mean over the
completion tokens of all four micro-batches, computed by the naive padded forward of tests/reference.py on
an unpatched copy of the initial weights.
"""
import argparse
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from reference import padded_completion_logprobs, tiny_causal_lm  # noqa: E402

from pg_deepspeed.collectives import end_process  # noqa: E402
from pg_deepspeed import patch_model  # noqa: E402
from pg_deepspeed.grpo.args import GRPOArguments, TrainArguments  # noqa: E402
from pg_deepspeed.grpo.nonfinite import NonFiniteGuard  # noqa: E402
from pg_deepspeed.grpo.steps import Batch, update  # noqa: E402
from zero3_train import full_weights  # noqa: E402  (this directory is the script's, so on sys.path)

PROMPTS, GROUP, MICRO_BATCHES, LR = 2, 3, 2, 0.5
# completion lengths per (rank, micro-batch): short and long on both ranks, in a different order
LENGTHS = {(0, 0): (1, 3), (0, 1): (8, 12), (1, 0): (9, 12), (1, 1): (1, 2)}


def rank_batch(rank: int) -> Batch:
    """This rank's rollout batch of MICRO_BATCHES micro-batches, rows of a group consecutive."""
    g = torch.Generator().manual_seed(100 + rank)
    B, N, Lp, Lc = PROMPTS * MICRO_BATCHES, PROMPTS * MICRO_BATCHES * GROUP, 10, 12
    prompt_lens = torch.randint(3, Lp + 1, (B,), generator=g)
    prompt_mask = (torch.arange(Lp) >= Lp - prompt_lens[:, None]).long()
    lengths = torch.cat([torch.randint(*LENGTHS[rank, i], (PROMPTS * GROUP,), generator=g)
                         for i in range(MICRO_BATCHES)])
    completion_mask = (torch.arange(Lc) < lengths[:, None]).long()
    advantages = torch.randn(N, generator=g)
    return Batch(torch.randint(4, 128, (B, Lp), generator=g) * prompt_mask, prompt_mask,
                 torch.randint(4, 128, (N, Lc), generator=g) * completion_mask, completion_mask,
                 rewards=torch.zeros(N), advantages=advantages)


def reference_update(initial: dict[str, torch.Tensor], batches: list[Batch], per_micro_batch: bool):
    """-LR × the gradient of one token-mean over all micro-batches (or, per_micro_batch, of the mean of their means)."""
    model = tiny_causal_lm("qwen2")
    model.load_state_dict(initial)
    parts = [b.micro_batch(i, PROMPTS, GROUP) for b in batches for i in range(MICRO_BATCHES)]
    sums, counts = [], []
    for part in parts:
        logps, _ = padded_completion_logprobs(model, part.prompt_ids, part.prompt_mask, part.completion_ids,
                                              part.completion_mask, GROUP)
        ratio = torch.exp(logps - logps.detach())  # the first update: old log-probs are the current ones
        sums.append((-ratio * part.advantages[:, None] * part.completion_mask).sum())
        counts.append(part.completion_mask.sum())
    if per_micro_batch:
        loss = sum(s / c for s, c in zip(sums, counts)) / len(parts)
    else:
        loss = sum(sums) / sum(counts)
    loss.backward()
    return {name: -LR * p.grad for name, p in model.named_parameters()}


def relative_error(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in b) ** 0.5
    return num / sum(float(b[k].norm() ** 2) for k in b) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, world
    model = patch_model(tiny_causal_lm("qwen2"))
    config = {"train_micro_batch_size_per_gpu": PROMPTS, "gradient_accumulation_steps": MICRO_BATCHES,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
              "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=config)
    initial = full_weights(engine.module)
    grpo = GRPOArguments(num_generations=GROUP, loss_aggregation="token-mean", max_new_tokens=12)
    train = TrainArguments(ds_config="-", prompts_per_device=PROMPTS, gradient_accumulation_steps=MICRO_BATCHES)
    update(engine, rank_batch(rank), grpo, train, NonFiniteGuard(max_consecutive=1), step=1)
    final = full_weights(engine.module)
    if rank == 0:
        moved = {k: final[k] - initial[k] for k in initial}
        batches = [rank_batch(r) for r in range(world)]
        result = {
            "step_mean_error": relative_error(moved, reference_update(initial, batches, per_micro_batch=False)),
            "mean_of_means_error": relative_error(moved, reference_update(initial, batches, per_micro_batch=True)),
        }

        with open(os.path.join(args.out, "token_mean.json"), "w") as file:
            json.dump(result, file)


if __name__ == "__main__":
    main()
    end_process()
