"""Every log-prob pass on two ZeRO-3 ranks whose micro-batches need different numbers of LM-head calls.

    deepspeed --num_gpus 2 tests/dist/equal_head_calls.py --out DIR     # each rank writes DIR/rank<r>.json

Under the shipped ds_configs/zero3_cpu.json the LM head's weight is partitioned, so each head call is a ZeRO-3
gather (forward, and again in the checkpointed backward). Rank 0's completions hold COMPLETION_TOKENS[0] tokens and
rank 1's COMPLETION_TOKENS[1]: in chunks of CHUNK rows they need 6 and 1 head calls. The passes of a GRPO step run
on both: the policy with a backward and an optimizer step (with entropies), the old policy and the frozen reference
under no_grad, and the supervised warm-up's G = 1. Each rank compares every pass's log-probs with the naive padded
forward of tests/reference.py on an unpatched copy of the gathered weights.
"""
import argparse
import json
import os
import sys
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from reference import padded_completion_logprobs  # noqa: E402

from pg_deepspeed.collectives import end_process  # noqa: E402
from pg_deepspeed import completion_logprobs  # noqa: E402
from pg_deepspeed.distributed.engines import build_model, init_policy, init_reference  # noqa: E402
from pg_deepspeed.distributed.ds_config import load_ds_config  # noqa: E402
from pg_deepspeed.demo.presets import preset_config  # noqa: E402
from zero3_train import full_weights  # noqa: E402  (this directory is the script's, so on sys.path)

MODEL, PROMPTS, GROUP, CHUNK = "tiny-qwen2", 2, 4, 8
COMPLETION_TOKENS = {0: 44, 1: 8}  # 6 and 1 head calls of CHUNK rows


def ds_config() -> dict:
    config = load_ds_config("ds_configs/zero3_cpu.json", micro_batch_size=PROMPTS, gradient_accumulation_steps=1,
                          world_size=2, hidden_size=preset_config(MODEL).hidden_size, dtype="float32", lr=1e-3,
                          weight_decay=0.0, warmup_steps=0, total_steps=2)
    config.pop("scheduler")  # DeepSpeed's warm-up schedulers give the first step lr 0: this one must move the weights
    return config


def rank_batch(rank: int) -> tuple[torch.Tensor, ...]:
    """PROMPTS left-padded prompts and GROUP completions each holding COMPLETION_TOKENS[rank] tokens in all."""
    g = torch.Generator().manual_seed(10 + rank)
    prompt_lens = torch.randint(3, 12, (PROMPTS,), generator=g)
    Lp, N = int(prompt_lens.max()), PROMPTS * GROUP
    lengths = torch.full((N,), COMPLETION_TOKENS[rank] // N)
    lengths[: COMPLETION_TOKENS[rank] % N] += 1
    Lc = int(lengths.max())
    prompt_mask = (torch.arange(Lp) >= Lp - prompt_lens[:, None]).long()
    completion_mask = (torch.arange(Lc) < lengths[:, None]).long()
    return (torch.randint(4, 60, (PROMPTS, Lp), generator=g), prompt_mask,
            torch.randint(4, 60, (N, Lc), generator=g) * completion_mask, completion_mask)


def max_error(engine, batch, group: int, reference) -> float:
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    expected, _ = padded_completion_logprobs(reference, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                             group)
    got = completion_logprobs(engine, prompt_ids, prompt_mask, completion_ids, completion_mask, group,
                              chunk_size=CHUNK)
    return float((got - expected).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed(timeout=timedelta(seconds=60))  # a collective mismatch fails, not a 10-min hang
    rank = dist.get_rank()
    plain = AutoModelForCausalLM.from_config(preset_config(MODEL)).eval()  # before the ZeRO-3 loads: not sharded
    torch.manual_seed(0)
    policy = init_policy(build_model(MODEL, ds_config(), dtype=torch.float32), ds_config())
    torch.manual_seed(0)
    reference_engine = init_reference(MODEL, ds_config(), dtype=torch.float32)
    plain.load_state_dict(full_weights(policy.module))

    batch = rank_batch(rank)
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    result = {"head_calls": -(-int(completion_mask.sum()) // CHUNK),
              "head_partitioned": hasattr(policy.module.get_output_embeddings().weight, "ds_numel")}
    with torch.no_grad():
        result["old_error"] = max_error(policy, batch, GROUP, plain)
        result["reference_error"] = max_error(reference_engine, batch, GROUP, plain)
        result["warmup_g1_error"] = max_error(policy, (prompt_ids.repeat_interleave(GROUP, 0),
                                                       prompt_mask.repeat_interleave(GROUP, 0), completion_ids,
                                                       completion_mask), 1, plain)
    logps, entropies = completion_logprobs(policy, *batch, GROUP, chunk_size=CHUNK, return_entropy=True)
    expected, expected_entropies = padded_completion_logprobs(plain, *batch, GROUP)
    result["policy_error"] = float((logps.detach() - expected).abs().max())
    result["entropy_error"] = float((entropies.detach() - expected_entropies).abs().max())
    loss = -(logps * completion_mask).sum() / completion_mask.sum() - 0.01 * entropies.sum() / completion_mask.sum()
    policy.backward(loss)
    policy.step()
    moved = full_weights(policy.module)
    result["weights_moved_and_finite"] = all(
        bool(torch.isfinite(moved[k]).all()) for k in moved) and any(
        not torch.equal(moved[k], v) for k, v in plain.state_dict().items() if k in moved)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main()
    end_process()
