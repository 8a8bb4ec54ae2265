"""`make gpu-check`: the first thing to run on a machine with a GPU.

    python -m benchmarks.gpu_check                 # writes docs/gpu-check.md and docs/gpu/*
    python -m benchmarks.gpu_check --no-bench      # conformance only

1. Stops (exit 2, writes nothing) when torch sees no CUDA device: no empty figures.
2. Records the machine: GPU, compute capability, torch/CUDA/HIP, flash-attn and FlashAttention-3, and what
   every backend says it can do in bfloat16 and float32 on this GPU (`available()`; "auto" picks the first).
3. Runs the `cuda`-marked tests (tests/test_gpu_conformance.py: every runnable backend against `cpu`,
   outputs and gradients), recording each measured error.
4. Runs the GPU benchmark presets of benchmarks/bench_logprobs.py: `gpu` (any GPU with 24 GB) and, on a
   GPU with at least 70 GiB, `h100` (the H100 targets of docs/performance.md); there also the rollout benchmark's
   `h100` preset (benchmarks/bench_rollout.py: shared cache, repeated cache, stock generate and, when vLLM is
   installed, the colocated vLLM engine).
5. Writes docs/gpu-check.md: all of the above, for docs/performance.md's GPU section. Exits 1 if a test failed.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import torch

from pg_deepspeed.attention import BACKENDS, resolve_backend

REPO = Path(__file__).resolve().parent.parent
H100_PRESET_MIN_GIB = 70


def machine() -> list[str]:
    """Markdown lines: what this GPU and software are, and what each backend says about them."""
    props = torch.cuda.get_device_properties(0)
    try:
        flash_attn = importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        flash_attn = "not installed"
    fa3 = "installed" if importlib.util.find_spec("flash_attn_interface") else "not installed"
    lines = [
        f"- GPU: {props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, HIP {torch.version.hip}; "
        f"flash-attn {flash_attn}; FlashAttention-3 {fa3}",
        "",
        "| backend | bfloat16 | float32 |",
        "|---|---|---|",
    ]
    cuda = torch.device("cuda")
    for name, module in BACKENDS.items():
        cells = [module.available(cuda, dtype) or "runs" for dtype in (torch.bfloat16, torch.float32)]
        lines.append(f"| `{name}` | {cells[0]} | {cells[1]} |")
    picks = [resolve_backend("auto", cuda, dtype).__name__.rsplit(".", 1)[-1] for dtype in (torch.bfloat16, torch.float32)]
    lines.append(f"| `auto` | `{picks[0]}` | `{picks[1]}` |")
    return lines


def conformance(out: Path) -> tuple[list[str], bool]:
    """Run the cuda-marked tests; markdown lines of their outcome and figures, and whether all passed."""
    figures, junit = out / "conformance.jsonl", out / "conformance.xml"
    figures.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", f"--junitxml={junit}", "tests"]
    env = {**os.environ, "PG_GPU_FIGURES": str(figures)}
    code = subprocess.run(cmd, cwd=REPO, env=env).returncode
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    lines = [f"`{' '.join(cmd[2:])}`: {counts['tests']} tests, {counts['failures']} failed, "
             f"{counts['errors']} errors, {counts['skipped']} skipped (pytest exit code {code}).", ""]
    for case in suite.iter("testcase"):
        for failure in list(case.iter("failure")) + list(case.iter("error")):
            lines.append(f"- FAILED `{case.get('name')}`: {(failure.get('message') or '').splitlines()[0][:300]}")
    skips = Counter(skip.get("message", "") for case in suite.iter("testcase") for skip in case.iter("skipped"))
    lines += [f"- skipped {n}: {reason}" for reason, n in sorted(skips.items())]
    worst: dict[tuple, dict] = {}  # (backend, dtype, head dim) -> the record closest to its bound
    records = map(json.loads, figures.read_text().splitlines()) if figures.exists() else []
    for record in records:
        if "rel_err" in record:
            key = (record["backend"], record["dtype"], record["d"])
            if key not in worst or record["rel_err"] / record["bound"] > worst[key]["rel_err"] / worst[key]["bound"]:
                worst[key] = record
    lines += ["", "Per backend, dtype and head dim, the error closest to its bound (relative to the exact answer, "
              "over all layouts and out/dq/dk/dv):", "",
              "| backend | dtype | head dim | rel err | bound |", "|---|---|---|---|---|"]
    lines += [f"| `{b}` | {dt} | {d} | {r['rel_err']:.2e} ({r['tensor']}, {r['case']}) | {r['bound']:.2e} |"
              for (b, dt, d), r in sorted(worst.items())]
    return lines, code == 0


def benchmarks(out: Path, report_dir: Path) -> list[str]:
    """Run the GPU presets of bench_logprobs (and bench_rollout's h100 on a large GPU); markdown lines with each
    preset's table."""
    presets = ["gpu"]
    if torch.cuda.get_device_properties(0).total_memory / 2**30 >= H100_PRESET_MIN_GIB:
        presets.append("h100")
    runs = [("bench_logprobs", preset) for preset in presets]
    if "h100" in presets:
        runs.append(("bench_rollout", "h100"))
    lines = []
    for bench, preset in runs:
        target = out / preset if bench == "bench_logprobs" else out / f"rollout_{preset}"
        cmd = [sys.executable, "-m", f"benchmarks.{bench}", "--preset", preset, "--out", str(target)]
        code = subprocess.run(cmd, cwd=REPO).returncode
        table = target / f"{bench}.md"
        lines += [f"### `{bench}` preset `{preset}`", ""]
        if code != 0 or not table.exists():
            lines += [f"`{' '.join(cmd[2:])}` failed with exit code {code}; no figures.", ""]
            continue
        body = table.read_text().splitlines()
        lines += ["```", *[line for line in body if not line.startswith("|")], "```", "",
                  *[line for line in body if line.startswith("|")], "",
                  f"![{bench}]({os.path.relpath(target / f'{bench}.png', report_dir)})", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--report", type=Path, default=REPO / "docs" / "gpu-check.md")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "gpu", help="folder for the figures' files")
    p.add_argument("--no-bench", action="store_true", help="skip the benchmark presets")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("make gpu-check needs a CUDA GPU, and torch sees none: nothing run, nothing written.", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    tests, passed = conformance(args.out)
    report = ["# GPU check (`make gpu-check`)", "", "## Machine and backends", "", *machine(), "",
              "## Conformance (tests marked `cuda`)", "", *tests, ""]
    if not args.no_bench:
        report += ["## Benchmarks (GPU presets of benchmarks/bench_logprobs.py and bench_rollout.py)", "",
                   *benchmarks(args.out, args.report.parent)]
    args.report.write_text("\n".join(report) + "\n")
    print(f"wrote {args.report}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
