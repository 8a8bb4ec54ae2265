"""Two ranks: stock trl.GRPOTrainer, then PrefixGroupedGRPOTrainer, same seed and data; each rank saves what it saw.

    deepspeed --num_gpus 2 tests/dist/trl_two_ranks.py --model DIR --out DIR [--zero3]

The deepspeed launcher starts the two processes (gloo on CPU); the trainers run TRL's default multi-process setup,
DistributedDataParallel through accelerate, or with --zero3 DeepSpeed ZeRO-3 through accelerate (GRPOConfig's
`deepspeed=`, which also makes TRL wrap the reference model in its own engine).
per_device_train_batch_size=6 with 4 completions per prompt puts one group's rows on both ranks (rows 4-5 of rank 0
and 0-1 of rank 1). tests/test_trl.py checks the result: per-rank losses equal stock TRL's, the final weights equal
on both ranks and equal stock TRL's.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_trl import _train  # noqa: E402  (the same train() runner as the single-process tests)

from trl import GRPOTrainer  # noqa: E402

from pg_deepspeed.collectives import end_process  # noqa: E402
from pg_deepspeed.integrations.trl import PrefixGroupedGRPOTrainer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--zero3", action="store_true")
parser.add_argument("--local_rank", type=int, default=0)  # appended by the launcher
args = parser.parse_args()

settings = dict(per_device_train_batch_size=6, num_generations=4, gradient_accumulation_steps=1, max_steps=2,
                num_iterations=2, beta=0.1)
if args.zero3:
    import deepspeed
    import torch._dynamo  # noqa: F401  (before zero.Init: a lazy dynamo import inside it fails, "Signature mismatch")

    # TRL loads the model (under zero.Init) before the Trainer sets up the processes; zero.Init reads the world size
    deepspeed.init_distributed(dist_backend="gloo")

    settings["deepspeed"] = {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,  # the client SGD
    }
result = {}
for cls in (GRPOTrainer, PrefixGroupedGRPOTrainer):
    losses, tokens, weights, batches, wrapper = _train(cls, args.model, Path(args.out), **settings)
    prompts = [[tuple(ids[m.bool()].tolist()) for ids, m in zip(b["prompt_ids"], b["prompt_mask"])] for b in batches]
    result[cls.__name__] = {"losses": losses, "tokens": tokens, "weights": weights, "prompts": prompts,
                           "wrapper": wrapper}
rank = dist.get_rank()
torch.save(result, Path(args.out) / f"rank{rank}.pt")
print(f"rank {rank} done", flush=True)
end_process()
