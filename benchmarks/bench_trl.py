"""Stock trl.GRPOTrainer against PrefixGroupedGRPOTrainer: the same TRL run, time and peak memory of an update step.

    PYTHONPATH=. python benchmarks/bench_trl.py --prompt 4096 --completion 128 --group 8      # docs/trl.md's table
    PYTHONPATH=. python benchmarks/bench_trl.py --prompt 512 --completion 16 --group 4        # a quick look

Each trainer runs in its own fresh process (peak RSS is per process) on the `tiny-qwen2` preset (4 layers, hidden
128, vocab 100) with one prompt of `--prompt` random characters per group and `--group` completions of exactly
`--completion` tokens (EOS is never sampled: min_new_tokens). `num_iterations=2`: train() step 1 generates, step 2
reuses the batch, so step 2's `training_step` is the update alone (policy forward, loss, backward) without
generation. Reported: step 2's time (best of --repeats runs) and its peak RSS growth; step 1's time for reference.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(args: argparse.Namespace) -> None:
    """One trainer, one run: print a JSON line with step times and the update step's peak memory."""
    sys.path.insert(0, str(ROOT))
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.memory import cpu_peak_mib
    from pg_deepspeed.integrations.trl import PrefixGroupedGRPOTrainer
    from pg_deepspeed.demo.presets import preset_config
    from pg_deepspeed.demo.char_tokenizer import build_char_tokenizer

    torch.manual_seed(0)
    work = Path(args.work)
    model_dir = work / "model"
    if not model_dir.exists():
        config = preset_config("tiny-qwen2")
        config.max_position_embeddings = max(config.max_position_embeddings, args.prompt + args.completion)
        AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer = build_char_tokenizer()
    tokenizer.padding_side = "left"
    letters = torch.randint(0, 26, (4, args.prompt)).tolist()
    data = Dataset.from_dict({"prompt": ["".join(chr(97 + c) for c in row) for row in letters]})
    cls = PrefixGroupedGRPOTrainer if args.trainer == "grouped" else GRPOTrainer
    config = GRPOConfig(
        output_dir=str(work / args.trainer), per_device_train_batch_size=args.group, num_generations=args.group,
        max_completion_length=args.completion, num_iterations=2, max_steps=2, use_cpu=True, bf16=False,
        report_to="none", save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
        generation_kwargs={"min_new_tokens": args.completion},
    )
    trainer = cls(model=str(model_dir), reward_funcs=lambda completions, **kw: [c.count("a") for c in completions],
                  args=config, train_dataset=data, processing_class=tokenizer)
    times, peaks = [], []
    training_step = trainer.training_step

    def timed_step(*a, **k):
        out = {}
        start = time.perf_counter()
        if len(times) == 1:  # the update step: measured alone, after step 1 ran generation
            peaks.append(cpu_peak_mib(lambda: out.setdefault("loss", training_step(*a, **k))))
        else:
            out["loss"] = training_step(*a, **k)
        times.append(time.perf_counter() - start)
        return out["loss"]

    trainer.training_step = timed_step
    trainer.train()
    print(json.dumps({"trainer": args.trainer, "step1_s": times[0], "update_s": times[1], "update_peak_mib": peaks[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--completion", type=int, default=128)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--trainer", choices=["stock", "grouped"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer:
        return child(args)
    work = tempfile.mkdtemp(prefix="bench_trl_")
    results = {}
    for trainer in ("stock", "grouped"):
        for _ in range(args.repeats):
            cmd = [sys.executable, __file__, "--trainer", trainer, "--work", work, "--prompt", str(args.prompt),
                   "--completion", str(args.completion), "--group", str(args.group)]
            run = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(run.stdout.strip().splitlines()[-1])
            best = results.get(trainer)
            results[trainer] = row if best is None or row["update_s"] < best["update_s"] else best
    print(f"P={args.prompt} S={args.completion} G={args.group}, tiny-qwen2, CPU float32, best of {args.repeats}")
    print("| trainer | update step (s) | update peak RSS growth (MiB) | step 1 with generation (s) |")
    print("|---|---|---|---|")
    for name, label in (("stock", "trl.GRPOTrainer"), ("grouped", "PrefixGroupedGRPOTrainer")):
        r = results[name]
        print(f"| {label} | {r['update_s']:.2f} | {r['update_peak_mib']:.0f} | {r['step1_s']:.2f} |")


if __name__ == "__main__":
    main()
