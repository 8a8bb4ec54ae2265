"""Two-rank ZeRO-3 checks run by tests/test_engines.py through the real launcher; results land in --out.

    deepspeed --num_gpus 2 tests/dist/zero3_train.py --mode main --out DIR     # runs A, B, C; saves A at step 2
    deepspeed --num_gpus 2 tests/dist/zero3_train.py --mode resume --out DIR   # resumes A from DIR, runs step 3

`main` trains three policies from the same seed on the same data, three AdamW steps each:
A prefix-grouped with activation checkpointing, B `prefix_grouping=False`, C the naive padded forward of
tests/reference.py. It also builds the reference engine, exports A, and reloads the export sharded.
Rank 0 writes `main.json` / `resume.json`, the full weights `params_initial.pt` and `params_<run>.pt` (final),
and `export_logits.pt`.
Each step's batch is drawn from the python, numpy and torch RNGs, so a resume matches only if all are restored.
"""
import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import deepspeed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from reference import padded_completion_logprobs  # noqa: E402

from pg_deepspeed.collectives import end_process  # noqa: E402
from pg_deepspeed import completion_logprobs  # noqa: E402
from pg_deepspeed.distributed.ds_config import load_ds_config  # noqa: E402
from pg_deepspeed.distributed.engines import (  # noqa: E402
    build_model, init_policy, init_reference, load_tokenizer, reference_config,
)
from pg_deepspeed.distributed.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pg_deepspeed.distributed.export import export_hf  # noqa: E402
from pg_deepspeed.demo.presets import preset_config  # noqa: E402

MODEL, SEED, STEPS, SAVE_AT, LR = "tiny-qwen2", 1234, 3, 2, 1e-3
PROMPTS, GROUP = 2, 3


def ds_config() -> dict:
    config = load_ds_config(
        "ds_configs/zero3_cpu.json", micro_batch_size=PROMPTS, gradient_accumulation_steps=1, world_size=2,
        hidden_size=preset_config(MODEL).hidden_size, dtype="float32", lr=LR, weight_decay=0.01, warmup_steps=1,
        total_steps=STEPS,
    )
    # DeepSpeed's warm-up schedulers give lr 0 to the first steps; a constant lr makes all three steps count
    config.pop("scheduler")
    # Adam's first update is lr * sign(g): float rounding in a gradient that is ~0 (k_proj.bias has an exactly
    # zero one) would flip it by 2 lr. With eps above the gradients the update is a smooth function of them.
    config["optimizer"]["params"]["eps"] = 1e-2
    return config


def draw_batch() -> tuple[torch.Tensor, ...]:
    """One rank's GRPO micro-batch from the global RNGs: prompts [B, Lp] left-padded, completions [N, Lc]."""
    prompt_lens = [random.randint(4, 12) for _ in range(PROMPTS)]
    completion_lens = np.random.randint(1, 9, size=PROMPTS * GROUP).tolist()
    lp, lc = max(prompt_lens), max(completion_lens)
    prompt_ids = torch.randint(4, 100, (PROMPTS, lp))
    prompt_mask = (torch.arange(lp) >= lp - torch.tensor(prompt_lens)[:, None]).long()
    completion_ids = torch.randint(4, 100, (PROMPTS * GROUP, lc))
    completion_mask = (torch.arange(lc) < torch.tensor(completion_lens)[:, None]).long()
    advantages = 0.5 + torch.rand(PROMPTS * GROUP)  # one sign, so the loss is no cancelling sum
    return prompt_ids, prompt_mask, completion_ids, completion_mask, advantages


def logprobs(engine, run: str, batch) -> torch.Tensor:
    prompt_ids, prompt_mask, completion_ids, completion_mask, _ = batch
    if run == "C":
        return padded_completion_logprobs(engine.module, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                          GROUP)[0]
    return completion_logprobs(engine, prompt_ids, prompt_mask, completion_ids, completion_mask, GROUP,
                               prefix_grouping=run == "A")


def train_step(engine, run: str) -> float:
    batch = draw_batch()
    completion_mask, advantages = batch[3], batch[4]
    loss = -(logprobs(engine, run, batch) * advantages[:, None]).sum() / completion_mask.sum()
    engine.backward(loss)
    engine.step()
    return loss.item()


def new_policy(run: str):
    torch.manual_seed(SEED)
    model = build_model(MODEL, ds_config(), dtype=torch.float32, gradient_checkpointing=run == "A")
    return init_policy(model, ds_config())


def seed_data() -> None:
    rank = dist.get_rank()
    random.seed(SEED + rank)
    np.random.seed(SEED + rank)
    torch.manual_seed(SEED + rank)


def full_weights(module) -> dict[str, torch.Tensor]:
    """Every parameter gathered, as CPU copies (on every rank)."""
    out = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            out[name] = param.detach().clone()
    return out


def shard_fractions(module) -> list[list]:
    """[name, this rank's ds_tensor numel, full ds_numel] per parameter."""
    return [[name, p.ds_tensor.numel(), p.ds_numel] for name, p in module.named_parameters()]


def gathered(value):
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def run_main(out: str) -> dict:
    result = {"losses": {}, "initial_weights_equal": True, "seconds": {}}
    initial = None
    for run in ("A", "B", "C"):
        start = time.perf_counter()
        engine = new_policy(run)
        weights = full_weights(engine.module)
        if initial is None:
            initial = weights
            result["policy_shards"] = gathered(shard_fractions(engine.module))
            result["policy_dtypes"] = sorted({str(p.dtype) for p in engine.module.parameters()})
            if dist.get_rank() == 0:
                torch.save(initial, os.path.join(out, "params_initial.pt"))
        else:
            result["initial_weights_equal"] &= all(torch.equal(initial[k], weights[k]) for k in initial)
        seed_data()
        losses = []
        for step in range(1, STEPS + 1):
            losses.append(gathered(train_step(engine, run)))
            if run == "A" and step == SAVE_AT:
                save_checkpoint(engine, os.path.join(out, "run"), step, {"data_position": step * PROMPTS})
        result["losses"][run] = losses
        final = full_weights(engine.module)
        if dist.get_rank() == 0:
            torch.save(final, os.path.join(out, f"params_{run}.pt"))
        if run == "A":
            policy_a = engine
        result["seconds"][run] = time.perf_counter() - start
    start = time.perf_counter()
    reference = init_reference(MODEL, ds_config(), dtype=torch.float32)
    result["reference_shards"] = gathered(shard_fractions(reference.module))
    result["reference_trainable"] = sum(p.requires_grad for p in reference.module.parameters())
    result["reference_optimizer"] = type(reference.optimizer).__name__  # ZeRO-3 with no optimizer: only the gatherer
    result["reference_lr_scheduler"] = reference.lr_scheduler is not None
    result["reference_training_mode"] = reference.module.training
    result["seconds"]["reference"] = time.perf_counter() - start
    start = time.perf_counter()
    result["export_and_reload"] = check_export(policy_a, out)
    result["seconds"]["export"] = time.perf_counter() - start
    return result


def check_export(engine, out: str) -> float:
    """Export A, save its logits on a fixed input for the test, and return the max |logit difference| of the
    export reloaded sharded by build_model."""
    export_dir = os.path.join(out, "export")
    export_hf(engine, load_tokenizer(MODEL), export_dir)
    input_ids = torch.randint(4, 100, (2, 17), generator=torch.Generator().manual_seed(SEED))
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=input_ids).logits
    if dist.get_rank() == 0:
        torch.save({"input_ids": input_ids, "logits": logits}, os.path.join(out, "export_logits.pt"))
    config = reference_config(ds_config())
    reloaded, *_ = deepspeed.initialize(model=build_model(export_dir, config, dtype=torch.float32), config=config)
    with torch.no_grad():
        return (reloaded(input_ids=input_ids).logits - logits).abs().max().item()


def run_resume(out: str) -> dict:
    engine = new_policy("A")
    client_state = load_checkpoint(engine, os.path.join(out, "run"))
    losses = [gathered(train_step(engine, "A")) for _ in range(client_state["step"] + 1, STEPS + 1)]
    final = full_weights(engine.module)
    if dist.get_rank() == 0:
        torch.save(final, os.path.join(out, "params_resumed.pt"))
    return {"client_state": client_state, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("main", "resume"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed()
    result = run_main(args.out) if args.mode == "main" else run_resume(args.out)
    if dist.get_rank() == 0:
        with open(os.path.join(args.out, f"{args.mode}.json"), "w") as file:
            json.dump(result, file, indent=1)


if __name__ == "__main__":
    main()
    end_process()
