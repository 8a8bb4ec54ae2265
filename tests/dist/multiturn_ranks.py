"""Two-rank ZeRO-3 multi-turn rollouts run by tests/test_multiturn.py through the real launcher; rank 0 writes
--out/result.json.

    deepspeed --num_gpus 2 tests/dist/multiturn_ranks.py --out DIR [--sp 2]

A tiny random Llama over the character vocabulary (its LM head biased towards EOS, so turns end by themselves) is
sharded by ZeRO-3 and samples with `--rollout_gather per_layer`, where every forward gathers each layer's weights
with a collective: ranks that made different numbers of forwards would fail or hang. Rank 0's environment ends every
conversation after its first turn; rank 1's continues to --max_turns 3, so rank 0 must join rank 1's later turns with
idle calls. The rollout runs twice, under `--rollout_gather per_layer` and `full` (the weights gathered once around
all turns), which must sample the same. Each rank records its sampling calls (steps.sample, counted), the turns of
its conversations and its batch's shapes.

With --sp 2 the two ranks are one sequence-parallel replica (same examples, same seed) and the environment answers
differently on each rank (it names its rank, and rank 1's ends conversations at once): the rollout must give both
ranks the group's first rank's conversations.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import pg_deepspeed.grpo.multiturn as multiturn  # noqa: E402
from pg_deepspeed import patch_model  # noqa: E402
from pg_deepspeed.collectives import end_process  # noqa: E402
from pg_deepspeed.demo.char_tokenizer import build_char_tokenizer  # noqa: E402
from pg_deepspeed.distributed.ds_config import load_ds_config  # noqa: E402
from pg_deepspeed.distributed.engines import init_policy  # noqa: E402
from pg_deepspeed.distributed.parallel_dims import ParallelDims  # noqa: E402
from pg_deepspeed.distributed.rollout_weights import gathered_for_generation  # noqa: E402
from pg_deepspeed.grpo.args import GRPOArguments  # noqa: E402
from pg_deepspeed.grpo.chat_turns import ChatTurns  # noqa: E402
from pg_deepspeed.grpo.data import Example  # noqa: E402
from pg_deepspeed.grpo.environments import with_environment  # noqa: E402
from pg_deepspeed.grpo.prompts import PromptFormat  # noqa: E402

# ChatML over the character vocabulary: each message closed by the tokenizer's EOS, as ChatML closes with <|im_end|>
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CALLS = {"sample": 0}

import gather_count  # noqa: E402  (before deepspeed)
import deepspeed  # noqa: E402


def counted(fn):
    def call(*args, **kwargs):
        CALLS["sample"] += 1
        return fn(*args, **kwargs)
    return call


multiturn.sample = counted(multiturn.sample)


class StopsOrGoes:
    """Done after the first turn where the example's answer is 'stop'; else an observation every turn."""

    def reset(self, example):
        self.stop = example["answer"] == "stop"
        return [{"role": "user", "content": example["prompt"]}]

    def step(self, messages):
        return [{"role": "tool", "content": "ok"}], 1.0 if self.stop else 0.5, self.stop


class SaysItsRank:
    """Not deterministic across ranks: the observation names the rank, and on rank 1 every conversation ends."""

    def reset(self, example):
        return [{"role": "user", "content": example["prompt"]}]

    def step(self, messages):
        rank = dist.get_rank()
        return [{"role": "tool", "content": f"rank {rank} says ok"}], float(rank), rank == 1


def eos_biased_llama(tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    head = torch.nn.Linear(32, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 3.2  # about 1/5 of the mass: turns of about 5 characters
    model.lm_head = head
    return patch_model(model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--sp", type=int, default=1)
    args = parser.parse_args()
    deepspeed.init_distributed()
    rank = dist.get_rank()
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    config = load_ds_config("ds_configs/zero3_cpu.json", micro_batch_size=2, gradient_accumulation_steps=1,
                            world_size=2, hidden_size=32, dtype="float32", lr=1e-3, weight_decay=0.0,
                            warmup_steps=0, total_steps=2, sequence_parallel_size=args.sp)
    config.pop("scheduler")
    dims = ParallelDims(2, args.sp)
    engine = init_policy(eos_biased_llama(tokenizer), config, dims=dims)
    options = multiturn.MultiTurnOptions(3, (2,), 24)
    answer = "stop" if dims.replica(rank) == 0 and args.sp == 1 else "go"
    examples = [Example(f"{a}+{b}=", answer) for a, b in ((1, 2), (3, 4))]
    environment = StopsOrGoes if args.sp == 1 else SaysItsRank
    seed = dims.replica(rank)
    gather_count.COUNT[0] = 0
    with gathered_for_generation(engine, "full"):  # what gathering the model once costs
        pass
    result = {"rank": rank, "one_gather": gather_count.COUNT[0]}
    for gather in ("per_layer", "full"):
        CALLS["sample"] = gather_count.COUNT[0] = 0
        grpo = GRPOArguments(num_generations=2, max_new_tokens=24, rollout_gather=gather, rollout_prefill_chunk=0)
        batch = multiturn.multiturn_rollout(engine, ChatTurns(PromptFormat(tokenizer)), environment, examples,
                                            with_environment(None), options, grpo, dims, torch.device("cpu"),
                                            torch.Generator().manual_seed(seed), seed)
        result[gather] = {"calls": CALLS["sample"], "all_gathers": gather_count.COUNT[0], "turns": [s["turns"] for s in batch.samples],
                          "ended": [s["ended"] for s in batch.samples], "rows": batch.completion_ids.shape[0],
                          "rewards": batch.rewards.tolist(), "completion_ids": batch.completion_ids.tolist(),
                          "messages": [s["messages"] for s in batch.samples]}
        result[f"{gather}/partitioned_after"] = all(
            p.ds_status.name == "NOT_AVAILABLE" or getattr(p, "ds_persist", False)
            for p in engine.module.parameters())
    results = [None, None]
    dist.all_gather_object(results, result)
    if rank == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
    end_process()
