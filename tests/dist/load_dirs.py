"""Two-rank ZeRO-3 loading and export of model directories, run by tests/test_engines.py through the real launcher.

    deepspeed --num_gpus 2 tests/dist/load_dirs.py --out DIR MODEL_DIR...

For each MODEL_DIR (saved by transformers in the test process), every rank builds the frozen reference engine from
it (`init_reference`: `from_pretrained` under ZeRO-3), computes prefix-grouped log-probs of a fixed batch, and
exports it (`export_hf`, sharded safetensors of at most 200 kB). Rank 0 writes `DIR/<name>.pt` with the log-probs,
the fully gathered weights and each rank's shard sizes; the export goes to `DIR/<name>-export`.
"""
import argparse
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from reference import random_grpo_batch  # noqa: E402

from pg_deepspeed.collectives import end_process  # noqa: E402
from pg_deepspeed import completion_logprobs  # noqa: E402
from pg_deepspeed.distributed.engines import init_reference, load_config  # noqa: E402
from pg_deepspeed.distributed.ds_config import load_ds_config  # noqa: E402
from pg_deepspeed.distributed.export import export_hf  # noqa: E402
from pg_deepspeed.demo.char_tokenizer import build_char_tokenizer  # noqa: E402

BATCH_SEED = 7


def check_dir(model_dir: str, out: str) -> None:
    name = os.path.basename(model_dir.rstrip("/"))
    ds_config = load_ds_config(
        "ds_configs/zero3_cpu.json", micro_batch_size=1, gradient_accumulation_steps=1, world_size=2,
        hidden_size=load_config(model_dir).hidden_size, dtype="float32", lr=1e-3, weight_decay=0.0, warmup_steps=0,
        total_steps=1,
    )
    engine = init_reference(model_dir, ds_config, dtype=torch.float32)
    shards = [[n, p.ds_tensor.numel(), p.ds_numel] for n, p in engine.module.named_parameters()]
    prompt_ids, prompt_mask, completion_ids, completion_mask, sizes = random_grpo_batch(BATCH_SEED, "left")
    with torch.no_grad():
        logps = completion_logprobs(engine, prompt_ids, prompt_mask, completion_ids, completion_mask, sizes)
    weights = {}
    for param_name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            weights[param_name] = param.detach().clone()
    all_shards = [None] * dist.get_world_size()
    dist.all_gather_object(all_shards, shards)
    export_hf(engine, build_char_tokenizer(), os.path.join(out, f"{name}-export"), max_shard_size="200kB")
    if dist.get_rank() == 0:
        torch.save({"logps": logps, "weights": weights, "shards": all_shards}, os.path.join(out, f"{name}.pt"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("dirs", nargs="+")
    args = parser.parse_args()
    deepspeed.init_distributed()
    for model_dir in args.dirs:
        check_dir(model_dir, args.out)


if __name__ == "__main__":
    main()
    end_process()
