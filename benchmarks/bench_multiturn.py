"""Log-prob pass over multi-turn conversations sampled as a tree: per-turn recomputation, the standard forward, flat
conversations and the tree, side by side.

    python -m benchmarks.bench_multiturn --preset cpu     # 2 prompts of 512 tokens, --branching 2,2,2: 8 conversations
                                                          # of 3 turns (32 assistant + 32 observation tokens each);
                                                          # median of 3 after a warm-up (~4 minutes on 1 core)
    python -m benchmarks.bench_multiturn --preset turns   # short prompts (64), long turns (128 + 128): when trees pay
    python -m benchmarks.bench_multiturn --preset smoke   # seconds; what tests/test_bench.py runs

The workload: each prompt's conversations form the tree --branching k1,k2,... samples: k1 first assistant turns,
each followed by its observation, k2 continuations of each, and so on; every leaf is one conversation (G = k1·k2·...).
Variants (one process, one model, rotating order after a warm-up), each log-probs + backward of the assistant
tokens (the observations are context, as the trainer's `score_mask=loss_mask` makes them):
  per_turn   each assistant turn of each conversation as its own sample, the prompt and the whole history before it
             as its context, one call per conversation (how trainers that split a conversation into turns train it)
  standard   every conversation whole beside its own copy of the prompt (`prefix_grouping=False`), a call per prompt
  flat       the prompt once per group, each conversation whole after it (two levels: today's single-turn packing)
  tree       the prompt once, every shared turn once, also through the LM head (`share_completions=True`: what
             `--environment` trains)
Before timing, standard, flat and tree must agree (float32, 1e-4). FLOPs: benchmarks/flops.py's forest_flops of what
each variant forwards; "FLOP limit" is the standard forward's FLOPs over the variant's, "% of limit" its measured
speedup over the standard forward as a share of that. Peak memory: each variant's first pass in a fresh subprocess
(benchmarks/memory.py). Writes <out>/multiturn_<preset>.md and prints it.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .flops import forest_flops
from .shapes import get_shape

VARIANTS = ("per_turn", "standard", "flat", "tree")
TOLERANCE = 1e-4
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Preset:
    shape: str
    prompts: int
    prompt: int            # prompt tokens
    branching: tuple[int, ...]
    assistant: int         # tokens of each assistant turn
    observation: int       # tokens of each observation after it
    warmup: int
    repeats: int


PRESETS = {
    "cpu": Preset("tiny", prompts=2, prompt=512, branching=(2, 2, 2), assistant=32, observation=32, warmup=1,
                  repeats=3),
    "turns": Preset("tiny", prompts=2, prompt=64, branching=(2, 2, 2), assistant=128, observation=128, warmup=1,
                    repeats=3),
    "smoke": Preset("tiny", prompts=2, prompt=12, branching=(2, 2), assistant=3, observation=2, warmup=0, repeats=1),
}


def turn_length(p: Preset) -> int:
    return p.assistant + p.observation


def make_batch(p: Preset, vocab: int, seed: int = 0):
    """prompts [B, P]; conversations [B*G, turns * (assistant + observation)], the leaves of each prompt's sampling
    tree in order (a turn shared by several leaves has the same tokens in each); masks all ones, and the assistant
    tokens' mask [B*G, turns * (assistant + observation)]."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(0, vocab, (p.prompts, p.prompt), generator=g)
    rows = []
    for _ in range(p.prompts):
        paths = [torch.empty(0, dtype=torch.long)]
        for k in p.branching:
            paths = [torch.cat([path, torch.randint(0, vocab, (turn_length(p),), generator=g)])
                     for path in paths for _ in range(k)]
        rows += paths
    completion_ids = torch.stack(rows)
    assistant = (torch.arange(completion_ids.shape[1]) % turn_length(p) < p.assistant).long().expand_as(completion_ids)
    return prompt_ids, torch.ones_like(prompt_ids), completion_ids, torch.ones_like(completion_ids), assistant


def forests(p: Preset) -> dict[str, tuple[list[int], list[int]]]:
    """(parents, lengths) of what each variant forwards."""
    B, P, T, turns, G = p.prompts, p.prompt, turn_length(p), len(p.branching), math.prod(p.branching)
    per_turn = ([-1] * (B * G * turns), [P + t * T + p.assistant for t in range(turns)] * (B * G))
    standard = ([-1] * (B * G), [P + turns * T] * (B * G))
    flat_parents, flat_lengths, tree_parents, tree_lengths = [], [], [], []
    for _ in range(B):
        root = len(flat_parents)
        flat_parents += [-1] + [root] * G
        flat_lengths += [P] + [turns * T] * G
        tree_parents.append(-1)
        tree_lengths.append(P)
        level = [len(tree_parents) - 1]
        for k in p.branching:
            nodes = []
            for parent in level:
                for _ in range(k):
                    tree_parents.append(parent)
                    tree_lengths.append(T)
                    nodes.append(len(tree_parents) - 1)
            level = nodes
    return {"per_turn": per_turn, "standard": standard, "flat": (flat_parents, flat_lengths),
            "tree": (tree_parents, tree_lengths)}


def make_variants(model, batch, p: Preset):
    """name -> fn(backward: bool) -> log-probs [N, turns * T] (per_turn: None)."""
    from pg_deepspeed.models.logprobs import completion_logprobs

    prompt_ids, prompt_mask, completion_ids, completion_mask, assistant = batch
    G, T, turns = math.prod(p.branching), turn_length(p), len(p.branching)
    tokens = float(assistant.sum())

    def finish(logps, backward: bool):
        if backward:
            (logps.sum() / tokens).backward()
        return logps

    def per_prompt(**kwargs):
        return lambda backward: torch.cat([finish(completion_logprobs(
            model, prompt_ids[b:b + 1], prompt_mask[b:b + 1], completion_ids[b * G:(b + 1) * G],
            completion_mask[b * G:(b + 1) * G], G, score_mask=assistant[b * G:(b + 1) * G], **kwargs), backward)
            for b in range(p.prompts)])

    def per_turn(backward: bool):
        for n in range(completion_ids.shape[0]):
            b = n // G
            history = [torch.cat([prompt_ids[b], completion_ids[n, :t * T]]) for t in range(turns)]
            width = max(len(h) for h in history)
            ids = torch.stack([torch.nn.functional.pad(h, (width - len(h), 0)) for h in history])
            mask = torch.stack([torch.nn.functional.pad(torch.ones_like(h), (width - len(h), 0)) for h in history])
            turn = torch.stack([completion_ids[n, t * T:t * T + p.assistant] for t in range(turns)])
            finish(completion_logprobs(model, ids, mask, turn, torch.ones_like(turn), 1, prefix_grouping=False),
                   backward)
        return None

    def whole(**kwargs):
        return lambda backward: finish(completion_logprobs(model, *batch[:4], G, score_mask=assistant, **kwargs),
                                       backward)

    return {"per_turn": per_turn, "standard": per_prompt(prefix_grouping=False), "flat": whole(),
            "tree": whole(share_completions=True)}


def peak_memory(preset: str, variant: str, threads: int) -> float:
    """MiB: `variant`'s first pass (log-probs + backward) in a fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.bench_multiturn", "--preset", preset, "--threads", str(threads),
           "--probe_memory", variant]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    return float(json.loads(run.stdout.strip().splitlines()[-1])["peak_mib"])


def setup(p: Preset, threads: int):
    import pg_deepspeed

    if threads:
        torch.set_num_threads(threads)
    shape = get_shape(p.shape)
    model = pg_deepspeed.patch_model(shape.build(torch.float32, "cpu"))
    return shape, model, make_variants(model, make_batch(p, shape.vocab), p)


def run(preset: str, threads: int, memory: bool = True) -> list[dict]:
    p = PRESETS[preset]
    shape, model, variants = setup(p, threads)
    with torch.no_grad():
        logps = {name: variants[name](False) for name in ("standard", "flat", "tree")}
    worst = max(float((logps[n] - logps["tree"]).abs().max()) for n in logps)
    print(f"agreement, max |logp - logp_tree|: {worst:.2e}", flush=True)
    if worst > TOLERANCE:
        raise RuntimeError(f"variants disagree by {worst} > {TOLERANCE}")
    times: dict[str, list[float]] = {n: [] for n in VARIANTS}
    for rep in range(p.warmup + p.repeats):
        for name in VARIANTS[rep % 4:] + VARIANTS[:rep % 4]:
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            variants[name](True)
            if rep >= p.warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    turns, G = len(p.branching), math.prod(p.branching)
    # LM-head rows: the assistant tokens of every conversation; the tree each distinct turn's once
    distinct = sum(math.prod(p.branching[:k + 1]) for k in range(turns))
    every = p.prompts * G * turns * p.assistant
    scored = {"per_turn": every, "standard": every, "flat": every, "tree": p.prompts * distinct * p.assistant}
    work = {n: forest_flops(shape, *f, scored[n]) for n, f in forests(p).items()}
    tokens = {n: sum(f[1]) for n, f in forests(p).items()}
    peaks = {n: peak_memory(preset, n, threads) for n in VARIANTS} if memory else {n: math.nan for n in VARIANTS}
    ms = {n: statistics.median(t) for n, t in times.items()}
    base = work["standard"].total
    return [{
        "variant": n, "tokens": tokens[n], "median_ms": ms[n], "gflop": work[n].total / 1e9,
        "x_standard": ms["standard"] / ms[n], "flop_limit": base / work[n].total,
        "pct_of_limit": 100.0 * (ms["standard"] / ms[n]) / (base / work[n].total), "x_flat": ms["flat"] / ms[n],
        "flop_limit_vs_flat": work["flat"].total / work[n].total, "peak_mib": peaks[n],
    } for n in VARIANTS]


def format_table(preset: str, rows: list[dict], threads: int) -> str:
    p = PRESETS[preset]
    head = (f"{p.prompts} prompts of {p.prompt} tokens, --branching {','.join(map(str, p.branching))} "
            f"({math.prod(p.branching)} conversations each, {len(p.branching)} turns of {p.assistant} assistant + "
            f"{p.observation} observation tokens); shape {p.shape}, float32, CPU, {threads} thread(s); median of "
            f"{p.repeats} after {p.warmup} warm-up; peak memory: first pass in a fresh process\n\n")
    lines = ["| variant | tokens forwarded | median ms | GFLOP | x standard | FLOP limit | % of limit | x flat | "
             "limit vs flat | peak MiB |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['tokens']} | {r['median_ms']:.0f} | {r['gflop']:.2f} | "
                     f"{r['x_standard']:.2f} | {r['flop_limit']:.2f} | {r['pct_of_limit']:.1f} | {r['x_flat']:.2f} | "
                     f"{r['flop_limit_vs_flat']:.2f} | {r['peak_mib']:.0f} |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--probe_memory", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_memory:
        from .memory import cpu_peak_mib

        _, _, variants = setup(PRESETS[args.preset], args.threads)
        print(json.dumps({"peak_mib": cpu_peak_mib(lambda: variants[args.probe_memory](True))}))
        return
    table = format_table(args.preset, run(args.preset, args.threads), args.threads)
    print(table, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"multiturn_{args.preset}.md").write_text(table)


if __name__ == "__main__":
    main()
