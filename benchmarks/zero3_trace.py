"""Diagnostic: what the GRPO step does to DeepSpeed ZeRO-3's prefetch trace, and what one reset per pass changes.

    deepspeed --num_gpus 2 benchmarks/zero3_trace.py --steps 8              # as the trainer runs today
    deepspeed --num_gpus 2 benchmarks/zero3_trace.py --steps 8 --reset      # also a trace step at each policy pass

ZeRO-3 records the order of submodule calls between two calls of the root module's forward (its forward pre-hook
calls the coordinator's `reset_step`), then prefetches by that order while each later step repeats it, and drops the
trace ("Invalidate trace cache") when a step departs from it. Our log-prob passes call the decoder and the LM head,
never the root module, so they start a trace step only where `completion_logprobs` is given the engine (the
trainer's reference passes; the policy's are given the module). For each phase of a GRPO step (rollout, reference
log-probs, update) this prints the trace mode of each engine before and after, the invalidations during it, and its
time. The rollout, reference and update phases are the trainer's own functions (`grpo/trainer.py`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import deepspeed
import torch
import torch.distributed as dist

from pg_deepspeed.distributed.ds_config import load_ds_config
from pg_deepspeed.engine import build_model, init_policy, init_reference, load_config, load_tokenizer
from pg_deepspeed.grpo.args import GRPOArguments, TrainArguments
from pg_deepspeed.grpo.data import build_source
from pg_deepspeed.grpo.rewards import resolve_reward_fn
from pg_deepspeed.grpo.trainer import fill_fixed_logprobs, rollout, update
from pg_deepspeed.models.patch import patch_model


def coordinator(engine):
    """The engine's ZeRO-3 parameter coordinator (DeepSpeed internals: the policy's optimizer holds the offload
    object; the optimizer-less reference engine's `optimizer` is that object itself)."""
    return getattr(engine.optimizer, "parameter_offload", engine.optimizer).get_param_coordinator()


def mode(c) -> str:
    return "complete" if c.is_complete_trace() else "record" if c.is_record_trace() else "invalid"


def count_invalidations(c) -> list[int]:
    """Wrap the coordinator's invalidation to count calls (an observer: the original still runs)."""
    counter, original = [0], c._invalidate_trace

    def counted():
        counter[0] += 1
        original()

    c._invalidate_trace = counted
    return counter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--reset", action="store_true", help="also start a trace step at each policy log-prob pass")
    parser.add_argument("--ds_config", default="ds_configs/zero3_cpu.json")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()

    grpo = GRPOArguments(beta=0.04, num_generations=8, max_new_tokens=4)
    train = TrainArguments(ds_config=args.ds_config, prompts_per_device=4, gradient_accumulation_steps=2)
    tokenizer, config = load_tokenizer("tiny-qwen2"), load_config("tiny-qwen2")
    source = build_source("needle", None, 256, 0)
    reward_fn = resolve_reward_fn(None, synthetic=True, format_reward=0.2)
    ds_config = load_ds_config(
        args.ds_config, micro_batch_size=train.prompts_per_device,
        gradient_accumulation_steps=train.gradient_accumulation_steps, world_size=int(os.environ["WORLD_SIZE"]),
        hidden_size=config.hidden_size, dtype="float32", lr=1e-3, weight_decay=0.0, warmup_steps=1,
        total_steps=args.steps,
    )
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    policy = init_policy(build_model("tiny-qwen2", ds_config, dtype=torch.float32), ds_config)
    reference = init_reference("tiny-qwen2", ds_config, dtype=torch.float32)
    for engine in (policy, reference):
        patch_model(engine)
    engines = {"policy": policy, "reference": reference}
    coords = {name: coordinator(e) for name, e in engines.items()}
    invalidations = {name: count_invalidations(c) for name, c in coords.items()}

    if args.reset:  # the policy's passes also start a trace step: wrap the trainer's pass function
        import pg_deepspeed.grpo.trainer as trainer

        passes = trainer.completion_logprobs

        def reset_then_pass(model, *a, **kw):
            if model is policy.module:
                coords["policy"].reset_step()
            return passes(model, *a, **kw)

        trainer.completion_logprobs = reset_then_pass

    phases = {
        "rollout": lambda step: rollout(policy, tokenizer, source, reward_fn, grpo, train, step, rank, world,
                                        torch.device("cpu")),
        "reference": lambda batch: fill_fixed_logprobs(batch, policy, reference, grpo, train),
        "update": lambda batch: update(policy, batch, grpo, train),
    }
    rows = []
    for step in range(args.steps):
        batch = None
        for phase, run in phases.items():
            before = {n: mode(c) for n, c in coords.items()}
            counts = {n: k[0] for n, k in invalidations.items()}
            dist.barrier()
            t0 = time.perf_counter()
            out = run(step if phase == "rollout" else batch)
            dist.barrier()
            seconds = time.perf_counter() - t0
            batch = out if phase == "rollout" else batch
            rows.append({
                "step": step, "phase": phase, "seconds": round(seconds, 3),
                **{f"{n}_mode": f"{before[n]}->{mode(c)}" for n, c in coords.items()},
                **{f"{n}_invalidations": invalidations[n][0] - counts[n] for n in coords},
            })
    if rank == 0:
        for row in rows:
            print(json.dumps(row))
        later = [r for r in rows if r["step"] >= 2]  # steps 0-1 record the traces
        for phase in phases:
            times = [r["seconds"] for r in later if r["phase"] == phase]
            print(f"{phase}: median {statistics.median(times):.3f} s over steps 2..{args.steps - 1}; invalidations "
                  + ", ".join(f"{n} {sum(r[f'{n}_invalidations'] for r in later if r['phase'] == phase)}"
                              for n in coords))


if __name__ == "__main__":
    main()
