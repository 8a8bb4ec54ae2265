"""Log-prob pass over prompts that share a preamble: the standard forward, two levels and the tree, side by side.

    python -m benchmarks.bench_tree --preset ci       # 8 prompts share a 4096-token preamble, each a 512-token
                                                      # question and G=8 completions of 128; two_level and tree:
                                                      # median of 3 after a warm-up; standard: one timed run (it
                                                      # alone takes ~6 minutes on 1 core; ~20 minutes in all)
    python -m benchmarks.bench_tree --preset quarter  # the same at a quarter of every length, median of 3
    python -m benchmarks.bench_tree --preset smoke    # seconds; what tests/test_bench.py runs

Variants (one process, one model, interleaved with a rotating order after a warm-up), each log-probs + backward.
The standard forward runs `standard_runs` times without a warm-up of its own: it is one call per prompt, so its first
prompt warms the allocator for the other seven (a grouped variant is one call, all of it cold on its first run).
  standard   `completion_logprobs(..., prefix_grouping=False)`: every completion with its whole prompt, one call
             per prompt (the FLOPs of one call; per prompt so that its activations fit)
  two_level  `completion_logprobs(...)`: each prompt (preamble + question) once per group
  tree       `completion_logprobs(..., preamble=n)`: the preamble once, each question once, the completions
Before timing, the three must agree (float32, 1e-4). Each variant's FLOP limit is the standard forward's FLOPs over
its own (benchmarks/flops.py, forest_flops); "% of limit" is its measured speedup over the standard forward as a
share of that limit. Writes <out>/tree_<preset>.md and prints it.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .flops import forest_flops
from .shapes import get_shape

VARIANTS = ("standard", "two_level", "tree")
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Preset:
    shape: str
    prompts: int
    preamble: int
    question: int
    group_size: int
    completion: int
    warmup: int
    repeats: int
    standard_runs: int  # timed runs of the standard forward (<= repeats; it is warm after its first prompt)


PRESETS = {
    "ci": Preset("tiny", prompts=8, preamble=4096, question=512, group_size=8, completion=128, warmup=1, repeats=3,
                 standard_runs=1),
    "quarter": Preset("tiny", prompts=8, preamble=1024, question=128, group_size=8, completion=32, warmup=1, repeats=3,
                      standard_runs=3),
    "smoke": Preset("tiny", prompts=3, preamble=48, question=8, group_size=2, completion=4, warmup=0, repeats=1,
                    standard_runs=1),
}


def forests(p: Preset) -> dict[str, tuple[list[int], list[int]]]:
    """(parents, lengths) of what each variant computes."""
    B, n, q, G, S = p.prompts, p.preamble, p.question, p.group_size, p.completion
    standard = ([-1] * (B * G), [n + q + S] * (B * G))
    two_parents, two_lengths = [], []
    for _ in range(B):
        root = len(two_parents)
        two_parents += [-1] + [root] * G
        two_lengths += [n + q] + [S] * G
    tree_parents, tree_lengths = [-1], [n]
    for _ in range(B):
        question = len(tree_parents)
        tree_parents += [0] + [question] * G
        tree_lengths += [q] + [S] * G
    return {"standard": standard, "two_level": (two_parents, two_lengths), "tree": (tree_parents, tree_lengths)}


def make_batch(p: Preset, vocab: int, seed: int = 0):
    """prompts [B, n+q] = one preamble + each question; completions [B*G, S]; all masks ones."""
    g = torch.Generator().manual_seed(seed)
    preamble = torch.randint(0, vocab, (1, p.preamble), generator=g).expand(p.prompts, -1)
    questions = torch.randint(0, vocab, (p.prompts, p.question), generator=g)
    prompt_ids = torch.cat([preamble, questions], 1)
    completion_ids = torch.randint(0, vocab, (p.prompts * p.group_size, p.completion), generator=g)
    return prompt_ids, torch.ones_like(prompt_ids), completion_ids, torch.ones_like(completion_ids)


def make_variants(model, batch, p: Preset):
    """name -> fn(backward: bool) -> log-probs [N, S] (the last call's, for the standard per-prompt calls)."""
    from pg_deepspeed.models.logprobs import completion_logprobs

    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    G, tokens = p.group_size, float(completion_mask.sum())

    def call(rows: slice, members: slice, backward: bool, **kwargs):
        logps = completion_logprobs(model, prompt_ids[rows], prompt_mask[rows], completion_ids[members],
                                    completion_mask[members], G, **kwargs)
        if backward:
            (logps.sum() / tokens).backward()
        return logps

    def standard(backward: bool):
        return torch.cat([call(slice(b, b + 1), slice(b * G, (b + 1) * G), backward, prefix_grouping=False)
                          for b in range(p.prompts)])

    return {
        "standard": standard,
        "two_level": lambda backward: call(slice(None), slice(None), backward),
        "tree": lambda backward: call(slice(None), slice(None), backward, preamble=p.preamble),
    }


def run(p: Preset, threads: int) -> list[dict]:
    import pg_deepspeed

    if threads:
        torch.set_num_threads(threads)
    shape = get_shape(p.shape)
    model = pg_deepspeed.patch_model(shape.build(torch.float32, "cpu"))
    batch = make_batch(p, shape.vocab)
    variants = make_variants(model, batch, p)
    with torch.no_grad():
        logps = {name: fn(False) for name, fn in variants.items()}
    worst = max(float((logps[n] - logps["tree"]).abs().max()) for n in VARIANTS)
    print(f"agreement, max |logp - logp_tree|: {worst:.2e}", flush=True)
    if worst > TOLERANCE:
        raise RuntimeError(f"variants disagree by {worst} > {TOLERANCE}")
    times: dict[str, list[float]] = {n: [] for n in VARIANTS}
    for rep in range(p.warmup + p.repeats):
        order = VARIANTS[rep % 3:] + VARIANTS[: rep % 3]
        for name in order:
            if name == "standard" and (rep < p.warmup or len(times[name]) >= p.standard_runs):
                continue
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            variants[name](True)
            if rep >= p.warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    predicted = p.prompts * p.group_size * p.completion
    flops = {n: forest_flops(shape, *f, predicted).total for n, f in forests(p).items()}
    ms = {n: statistics.median(t) for n, t in times.items()}
    return [{
        "variant": n, "median_ms": ms[n], "best_ms": min(times[n]), "gflop": flops[n] / 1e9,
        "x_standard": ms["standard"] / ms[n], "flop_limit": flops["standard"] / flops[n],
        "pct_of_limit": 100.0 * (ms["standard"] / ms[n]) / (flops["standard"] / flops[n]),
        "x_two_level": ms["two_level"] / ms[n], "flop_limit_vs_two_level": flops["two_level"] / flops[n],
    } for n in VARIANTS]


def format_table(p: Preset, rows: list[dict]) -> str:
    head = (f"{p.prompts} prompts sharing a {p.preamble}-token preamble, {p.question}-token questions, G = "
            f"{p.group_size} completions of {p.completion} tokens; shape {p.shape}, float32, CPU; two_level and "
            f"tree: median of {p.repeats} after {p.warmup} warm-up; standard: median of {p.standard_runs}\n\n")
    lines = ["| variant | median ms | best ms | GFLOP | x standard | FLOP limit | % of limit | x two_level | "
             "limit vs two_level |", "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['median_ms']:.0f} | {r['best_ms']:.0f} | {r['gflop']:.1f} | "
                     f"{r['x_standard']:.2f} | {r['flop_limit']:.2f} | {r['pct_of_limit']:.1f} | "
                     f"{r['x_two_level']:.2f} | {r['flop_limit_vs_two_level']:.2f} |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="ci")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", default="outputs/bench")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    table = format_table(preset, run(preset, args.threads))
    print(table, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"tree_{args.preset}.md").write_text(table)


if __name__ == "__main__":
    main()
