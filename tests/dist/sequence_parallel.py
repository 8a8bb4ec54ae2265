"""Sequence parallelism against the unsharded standard forward, one ZeRO-3 update (real launcher, gloo).

    deepspeed --num_gpus 2 tests/dist/sequence_parallel.py --out DIR --family qwen2 --sp 2
    deepspeed --num_gpus 4 tests/dist/sequence_parallel.py --out DIR --family qwen2 --sp 2   # SP 2 x DP 2
    deepspeed --num_gpus 2 tests/dist/sequence_parallel.py --out DIR --sp 2 --share_completions  # sampling trees

Every rank of a sequence-parallel group gets the same micro-batch (its data-parallel replica's): several groups of
different G (one with G = 1), odd lengths, a long prompt that the shards split, an odd packed length; with
--share_completions, completions of a group that begin alike (the turns of a sampling tree), packed as a tree. The engine
(SGD, lr LR, no clipping) runs `completion_logprobs` and one update. Every rank checks, against the naive padded
forward of tests/reference.py on an unpatched copy of the initial weights:
- its log-probs (all of them, the same on every SP rank) and loss equal the reference's for its replica;
- its gradient (reduced, gathered) equals the mean over replicas of the reference gradients, every parameter;
- the SGD step moved every weight by -LR x that gradient.
Rank 0 writes DIR/sequence_parallel.json with the largest errors.
"""
import argparse
import copy
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from reference import padded_completion_logprobs, tiny_causal_lm, tiny_gpt_oss  # noqa: E402

from pg_deepspeed.collectives import end_process  # noqa: E402
from pg_deepspeed import completion_logprobs, patch_model  # noqa: E402
from pg_deepspeed.layouts.packing import pack_completions  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402
from pg_deepspeed.distributed.parallel_dims import ParallelDims  # noqa: E402
from pg_deepspeed.distributed.sequence_parallel import parallelize_sequence, sequence_parallel_mpu  # noqa: E402
from zero3_train import full_weights  # noqa: E402

LR, MICRO_BATCHES = 0.5, 2


def build(family: str) -> torch.nn.Module:
    if family == "gpt_oss":  # attention sinks: each rank's share of the heads needs its share of the sinks
        return tiny_gpt_oss()
    if family == "llama_mqa":  # one KV head: Ulysses replicates it to every rank
        return tiny_causal_lm("llama", num_key_value_heads=1)
    return tiny_causal_lm(family)


def hard_cases(batch, sp: int, share: bool = False) -> dict[str, bool]:
    """Which hard cases the packed micro-batch holds once split into `sp` equal shards (after the pad); `shared`:
    the tree packing (`share`) holds fewer tokens than the two-level one (read on the two-level packing's cuts)."""
    packing = pack_completions(*batch[:5])
    layout = packing.layout
    length = -(-layout.num_tokens // sp)
    shard = lambda i: i // length
    starts, sizes = layout.cu_groups[:-1].tolist(), layout.group_sizes.tolist()
    first = layout.cu_seqlens[:-1][layout.suffix_index.new_tensor(  # each member's first completion token
        [g + 1 + sum(sizes[:g]) + m for g in range(len(sizes)) for m in range(sizes[g])])]
    return {
        "prompt_split": any(shard(s) != shard(s + int(p) - 1) for s, p in zip(starts, layout.prefix_lens)),
        "predicted_across": any(shard(int(layout.predecessor[t])) != shard(int(t)) for t in first),
        "odd_length": layout.num_tokens % 2 == 1,
        "g1": 1 in sizes,
        "shared": share and pack_completions(*batch[:5], share_completions=True).layout.num_tokens < layout.num_tokens,
    }


def replica_batches(replica: int, sp: int, share: bool = False) -> list[tuple]:
    """Replica `replica`'s two micro-batches: groups of G = 1, 3, 2 with a 41-token middle prompt, left-padded, odd
    lengths. Drawn until, split into `sp` shards, the first has a prompt across a shard boundary and an odd length
    (a pad), and the second a member whose first token sits on another shard than the prompt's last token. `share`:
    the G = 3 group's first two completions begin with the same tokens (all but the shorter's last), and the G = 2
    group's with the same first token: trees of depth 2."""
    g = torch.Generator().manual_seed(1000 + replica)
    sizes, wanted, batches = [1, 3, 2], [("prompt_split", "odd_length"), ("predicted_across",)], []
    if share:
        wanted = [w + ("shared",) for w in wanted]
    for _ in range(20000):
        prompt_lens = [int(torch.randint(2, 10, (1,), generator=g)), 41, int(torch.randint(2, 30, (1,), generator=g))]
        completion_lens = torch.randint(1, 12, (sum(sizes),), generator=g)
        completion_lens[3] = 1
        Lp, Lc = max(prompt_lens) + 2, int(completion_lens.max()) + 1
        p = torch.tensor(prompt_lens)[:, None]
        prompt_mask = (torch.arange(Lp) >= Lp - p).long()
        completion_mask = (torch.arange(Lc) < completion_lens[:, None]).long()
        prompt_ids = torch.randint(3, 128, (len(sizes), Lp), generator=g) * prompt_mask
        completion_ids = torch.randint(3, 128, (sum(sizes), Lc), generator=g) * completion_mask
        if share:
            common = int(min(completion_lens[1], completion_lens[2])) - 1
            completion_ids[2, :common] = completion_ids[1, :common]
            completion_ids[5, 0] = completion_ids[4, 0]
        batch = prompt_ids, prompt_mask, completion_ids, completion_mask, sizes, torch.randn(sum(sizes), generator=g)
        cases = hard_cases(batch, sp, share)
        if sp == 1 or all(cases[k] for k in wanted[len(batches)]):
            batches.append(batch)
            if len(batches) == len(wanted):
                return batches
    raise RuntimeError(f"no micro-batch with the hard cases {wanted[len(batches)]} for sp={sp}")


def loss_of(logps: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """The first GRPO update's token-mean loss (old log-probs are the current ones)."""
    ratio = torch.exp(logps - logps.detach())
    return (-ratio * advantages[:, None] * mask).sum() / mask.sum()


def reference(initial: torch.nn.Module, replica: int, sp: int, grouped: bool, share: bool = False):
    """([log-probs], [loss], {name: grad}) of `replica`'s micro-batches on one process: the unsharded grouped forward
    (SP = 1), or the naive padded forward. The gradient is the mean over micro-batches (DeepSpeed's accumulation)."""
    model = copy.deepcopy(initial)
    all_logps, losses = [], []
    for batch in replica_batches(replica, sp, share):
        if grouped:
            logps = completion_logprobs(patch_model(model, max_length=64), *batch[:5], share_completions=share)
        else:
            logps, _ = padded_completion_logprobs(model, *batch[:5])
        loss = loss_of(logps, batch[3], batch[5])
        (loss / MICRO_BATCHES).backward()
        all_logps.append(logps.detach())
        losses.append(loss.item())
    return all_logps, losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--family", default="qwen2")
    parser.add_argument("--sp", type=int, default=2)
    parser.add_argument("--share_completions", action="store_true")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    replicas, replica = world // args.sp, rank // args.sp

    initial = build(args.family).train()  # unpatched: the reference
    model = patch_model(copy.deepcopy(initial), max_length=64)  # gpt-oss: its 64-token windows cover every row
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": MICRO_BATCHES, "sequence_parallel_size": "auto",
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
              "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    dims = ParallelDims(dist.get_world_size(), args.sp)
    model = parallelize_sequence(model, dims, config)
    config["sequence_parallel_size"] = args.sp
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=config, mpu=sequence_parallel_mpu(dims))

    share = args.share_completions
    batches, logps, losses = replica_batches(replica, args.sp, share), [], []
    for batch in batches:
        logps.append(completion_logprobs(engine, *batch[:5], share_completions=share))
        losses.append(loss_of(logps[-1], batch[3], batch[5]))
        engine.backward(losses[-1])
        if len(logps) < MICRO_BATCHES:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-batch
    got = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}  # the reduced gradient, gathered
    engine.step()
    final = full_weights(engine.module)
    stepped = max(float((final[n] - p.detach() + LR * got[n]).abs().max()) for n, p in initial.named_parameters())

    result = {"hard_cases": [hard_cases(b, args.sp, share) for b in batches], "step_error": stepped}
    for name, grouped in (("sp1", True), ("naive", False)):
        ref_logps, ref_loss, _ = reference(initial, replica, args.sp, grouped, share)
        grads = [reference(initial, r, args.sp, grouped, share)[2] for r in range(replicas)]
        expected = {n: sum(g[n] for g in grads) / replicas for n in grads[0]}  # DeepSpeed's mean over replicas
        result[name] = {
            "logp_error": max(float((a.detach() - b).abs().max()) for a, b in zip(logps, ref_logps)),
            "loss_error": max(abs(a.item() - b) / abs(b) for a, b in zip(losses, ref_loss)),
            # per parameter, max |error| / max |gradient|; k_proj's bias, whose exact gradient is 0, aside
            "grad_error": max((float((got[n] - expected[n]).abs().max() / expected[n].abs().max()), n)
                              for n in expected if expected[n].abs().max() > 1e-6),
            "missing_or_extra": sorted({n for n, g in expected.items() if g.any()}
                                       ^ {n for n, g in got.items() if g is not None and g.any()}),
        }
    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        with open(os.path.join(args.out, "sequence_parallel.json"), "w") as file:
            json.dump(results, file)


if __name__ == "__main__":
    main()
    end_process()
