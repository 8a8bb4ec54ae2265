"""Checkpoint save time under ZeRO-3: what the Slurm lead time (`--signal=USR1@<s>`) must cover.

    deepspeed --num_gpus 2 benchmarks/bench_checkpoint.py --hidden 1024 --layers 8 --out /tmp/ckpt --repeats 3

Builds a Qwen2-shaped model with random weights (vocab 32000) as the trainer's policy (`build_model`, `init_policy`,
AdamW), makes one optimizer step so every optimizer state exists, then times `pg_deepspeed.distributed.checkpoint.
save_checkpoint` (DeepSpeed's shards, RNG files, barrier, fsync, complete.json, pointer) `--repeats` times.
Rank 0 prints parameters, checkpoint bytes, the median seconds and the write rate; the lead time to ask for is
at least one step plus the save, with room for the slowest node.
"""
import argparse
import os
import shutil
import statistics
import time

import deepspeed
import torch
import torch.distributed as dist
from transformers import Qwen2Config

from pg_deepspeed import build
from pg_deepspeed.collectives import end_process
from pg_deepspeed.distributed.checkpoint import save_checkpoint
from pg_deepspeed.distributed.ds_config import load_ds_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ds_config", default="ds_configs/zero3_cpu.json")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed()
    config = Qwen2Config(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                         vocab_size=32000, max_position_embeddings=4096, use_cache=False)
    model_dir = os.path.join(args.out, "model")
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    dist.barrier()
    ds_config = load_ds_config(args.ds_config, micro_batch_size=1, gradient_accumulation_steps=1,
                               world_size=dist.get_world_size(), hidden_size=args.hidden, dtype="float32", lr=1e-4,
                               weight_decay=0.0, warmup_steps=0, total_steps=10)
    engine = build.init_policy(build.build_model(model_dir, ds_config, dtype=torch.float32), ds_config)
    params = sum(p.ds_numel for p in engine.module.parameters())
    loss = engine(input_ids=torch.randint(0, 32000, (1, 16))).logits.float().mean()
    engine.backward(loss)
    engine.step()
    seconds = []
    for step in range(1, args.repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        tag_dir = save_checkpoint(engine, os.path.join(args.out, "run"), step, {})
        seconds.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(tag_dir) for f in files)
        median = statistics.median(seconds)
        print(f"[bench_checkpoint] {params / 1e6:.1f} M parameters, world {dist.get_world_size()}: checkpoint "
              f"{size / 2**30:.2f} GiB ({size / params:.1f} bytes/parameter), save {median:.2f} s median of "
              f"{args.repeats} ({', '.join(f'{s:.2f}' for s in seconds)}), {size / median / 2**20:.0f} MiB/s",
              flush=True)
        shutil.rmtree(args.out)


if __name__ == "__main__":
    main()
    end_process()
