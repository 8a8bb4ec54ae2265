"""Two-rank ZeRO-3 rollouts run by tests/test_cache.py through the real launcher; rank 0 writes --out/result.json.

    deepspeed --num_gpus 2 tests/dist/rollout_gather.py --out DIR

A tiny Qwen2 policy built sharded (zero.Init) samples the same prompts with the same seed under
`--rollout_gather per_layer` and `full`, with the shared and the repeated cache, then takes one optimizer step and
samples again in both modes (the ZeRO-3 hooks must work again after a gathered rollout), and runs the held-out
evaluation (three batches, greedy and sampled each) in both modes, counting its all-gathers against one gather of the
whole model. Each rank has its own
prompts, so the ranks finish at different tokens; their prompt widths differ too, so a chunked prefill under
per-layer gathering (a collective per forward) must agree on one number of chunks. It counts the all-gathers that
torch.distributed sees during each rollout's decode loop (after the context's own gather), at two completion lengths.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

import gather_count  # noqa: E402  (before deepspeed)

import deepspeed  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from pg_deepspeed.collectives import end_process  # noqa: E402
from pg_deepspeed.distributed.engines import build_model, init_policy  # noqa: E402
from pg_deepspeed.distributed.ds_config import load_ds_config  # noqa: E402
from pg_deepspeed.distributed.rollout_weights import gathered_for_generation  # noqa: E402
from pg_deepspeed.generation.sampling import generate  # noqa: E402
from pg_deepspeed.demo.char_tokenizer import build_char_tokenizer  # noqa: E402
from pg_deepspeed.demo.presets import preset_config  # noqa: E402
from pg_deepspeed.distributed.parallel_dims import ParallelDims  # noqa: E402
from pg_deepspeed.grpo.args import GRPOArguments, TrainArguments  # noqa: E402
from pg_deepspeed.grpo.data import Example  # noqa: E402
from pg_deepspeed.grpo.evaluation import EvalSet, evaluate  # noqa: E402
from pg_deepspeed.grpo.prompts import PromptFormat  # noqa: E402
from pg_deepspeed.grpo.rewards import resolve_rewards  # noqa: E402

MODEL, SEED = "tiny-qwen2", 4321


def prompts(rank: int):
    """Rank 0: two prompts left-padded to 8 columns; rank 1: to 5 (so a chunked prefill makes 3 and 2 chunks)."""
    g = torch.Generator().manual_seed(SEED + rank)
    width, lengths = [(8, [3, 8]), (5, [5, 2])][rank]
    ids = torch.randint(4, 60, (2, width), generator=g)
    mask = (torch.arange(width) >= width - torch.tensor(lengths)[:, None]).long()
    return ids, mask


def rollout(engine, gather: str, cache: str, steps: int, rank: int, prefill_chunk: int = 0) -> tuple[list, int]:
    ids, mask = prompts(rank)
    engine.module.eval()
    with gathered_for_generation(engine, gather):
        gather_count.COUNT[0] = 0  # those of the decode loop only (entering "full" gathers the model once)
        out = generate(engine.module, ids, mask, 3, max_new_tokens=steps, temperature=1.0, top_p=1.0, eos_id=-1,
                       pad_id=0, generator=torch.Generator().manual_seed(SEED + 7 * rank), cache=cache,
                       prefill_chunk=prefill_chunk)
    engine.module.train()
    return out.completion_ids.tolist(), gather_count.COUNT[0]


def evaluation(engine, gather: str, rank: int) -> tuple[dict, int]:
    """The held-out evaluation of 12 examples (6 per rank, 2 per batch: 3 batches, each greedy and sampled) under
    `--rollout_gather gather`; (its metrics, the all-gathers it made)."""
    tokenizer = build_char_tokenizer()
    eval_set = EvalSet("sums", [Example(f"{a}+{a + 1}=", str(2 * a + 1)) for a in range(12)])
    # the share of digits in a completion: a score that tells a random model's samples apart (exact matches are 0)
    rewards = resolve_rewards(["varied_reward:digit_share"], None, synthetic=False, format_reward=0.0)
    grpo = GRPOArguments(max_new_tokens=4, rollout_gather=gather)
    train = TrainArguments(ds_config="-", prompts_per_device=2, seed=SEED)
    gather_count.COUNT[0] = 0
    result = evaluate(engine, PromptFormat(tokenizer), eval_set, rewards, grpo, train, ParallelDims(2), rank,
                      torch.device("cpu"), step=1)
    return result, gather_count.COUNT[0]


def whole_model_gathers(engine) -> int:
    """The all-gathers of gathering the whole model once."""
    gather_count.COUNT[0] = 0
    with gathered_for_generation(engine, "full"):
        pass
    return gather_count.COUNT[0]


def train_step(engine, rank: int) -> None:
    ids, mask = prompts(rank)
    logits = engine(input_ids=ids, attention_mask=mask).logits
    engine.backward(logits.float().pow(2).mean())
    engine.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    deepspeed.init_distributed()
    rank = dist.get_rank()
    config = load_ds_config("ds_configs/zero3_cpu.json", micro_batch_size=2, gradient_accumulation_steps=1,
                            world_size=2, hidden_size=preset_config(MODEL).hidden_size, dtype="float32", lr=1e-2,
                            weight_decay=0.0, warmup_steps=0, total_steps=2)
    config.pop("scheduler")
    torch.manual_seed(SEED)
    engine = init_policy(build_model(MODEL, config, dtype=torch.float32), config)
    result = {"rank": rank}
    for phase in ("before_step", "after_step"):
        for cache in ("shared", "repeat"):
            for gather in ("per_layer", "full"):
                for steps in (3, 9):
                    completions, gathers = rollout(engine, gather, cache, steps, rank)
                    result[f"{phase}/{cache}/{gather}/{steps}"] = {"completions": completions, "all_gathers": gathers}
            # a chunked prefill: 6 tokens per forward (3 columns of 2 prompts), so the ranks prefill in 3 and 2 chunks
            # unless they agree
            completions, _ = rollout(engine, "per_layer", cache, 9, rank, prefill_chunk=6)
            result[f"{phase}/{cache}/per_layer/9/chunked"] = {"completions": completions}
        result[f"{phase}/partitioned_after"] = all(
            p.ds_status.name == "NOT_AVAILABLE" or getattr(p, "ds_persist", False)
            for p in engine.module.parameters())
        if phase == "before_step":
            result["whole_model_gathers"] = whole_model_gathers(engine)
            for gather in ("per_layer", "full"):
                metrics, gathers = evaluation(engine, gather, rank)
                result[f"evaluation/{gather}"] = {"metrics": metrics, "all_gathers": gathers}
            train_step(engine, rank)
    results = [None, None]
    dist.all_gather_object(results, result)
    if rank == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
    end_process()
