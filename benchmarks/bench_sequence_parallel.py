"""Peak memory per rank of the update pass at sequence-parallel sizes 1 and 2: what sequence parallelism is for.

    python -m benchmarks.bench_sequence_parallel --preset ci      # tiny shape, CPU: P = 4K..16K, S = 256, G = 16
    python -m benchmarks.bench_sequence_parallel --preset long    # the same at P = 32K (about 30 minutes)
    python -m benchmarks.bench_sequence_parallel --preset h100    # 1.5b shape, bf16, P = 16K..128K (8 GPUs: SP 1, 2,
                                                                  # 4, 8 need as many; run on a node of 8)
    python -m benchmarks.bench_sequence_parallel --preset smoke   # seconds; what tests/test_bench.py runs

Each (SP, P) runs in a fresh launch on as many ranks as the largest SP size (SP = 1 then runs data parallel, so
that every size has the same ZeRO-3 sharding of the weights): a ZeRO-3 engine around the patched model,
sequence parallel when SP > 1, and per replica one prompt of P tokens with G completions of S tokens. Measured on every rank, once, in that fresh process: the activation memory (the bytes autograd saves
for backward during `completion_logprobs`, counted by a saved-tensors hook), the peak memory of the update pass
(`completion_logprobs` + GRPO-style loss + backward) above what was resident before it (benchmarks/memory.py:
peak RSS on CPU, `max_memory_allocated` on CUDA; it also holds transients: ZeRO-3's gathered weights, the
all-to-all buffers, the LM head's chunk), and its time. The table shows the largest rank's peak, the
ratio to SP = 1 at the same P, and per SP size the longest measured P whose peak fits the preset's budget.
Writes <out>/sequence_parallel_<preset>.md and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .launcher import free_port, remove_shm_buffers

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Preset:
    shape: str
    dtype: str
    prompts: tuple[int, ...]
    completion: int
    group_size: int
    sizes: tuple[int, ...]
    budget_mib: float


PRESETS = {
    "ci": Preset("tiny", "float32", (4096, 8192, 16384), 256, 16, (1, 2), budget_mib=2048),
    "long": Preset("tiny", "float32", (32768,), 256, 16, (1, 2), budget_mib=2048),  # ~30 min on 2 cores
    "h100": Preset("1.5b", "bfloat16", (16384, 32768, 65536, 131072), 512, 16, (1, 2, 4, 8), budget_mib=40 * 1024),
    "smoke": Preset("tiny", "float32", (64,), 8, 2, (1, 2), budget_mib=1024),
}


# ---------------------------------------------------------------------------------------------- one launch
def worker(shape_name: str, dtype_name: str, prompt: int, completion: int, group_size: int, sp: int, out: str
           ) -> None:
    """One rank of one (SP, P) measurement; rank 0 writes every rank's result to `out` (JSON)."""
    import deepspeed
    import torch.distributed as dist

    from pg_deepspeed import completion_logprobs, patch_model
    from pg_deepspeed.collectives import end_process
    from pg_deepspeed.distributed.parallel_dims import ParallelDims
    from pg_deepspeed.distributed.sequence_parallel import parallelize_sequence, sequence_parallel_mpu

    from .memory import cpu_peak_mib, cuda_peak_mib
    from .shapes import get_shape

    deepspeed.init_distributed()
    device = torch.device(deepspeed.get_accelerator().current_device_name())
    dtype = getattr(torch, dtype_name)
    if device.type == "cpu":
        torch.set_num_threads(1)  # one core per rank, as SP ranks on one CPU node would have
    shape = get_shape(shape_name)
    model = patch_model(shape.build(dtype, device), max_length=prompt + completion)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "sequence_parallel_size": sp,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
              "bf16": {"enabled": dtype == torch.bfloat16}}
    dims = ParallelDims(dist.get_world_size(), sp)
    model = parallelize_sequence(model, dims, config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=config, mpu=sequence_parallel_mpu(dims))
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, shape.vocab, (1, prompt), generator=g).to(device)
    completion_ids = torch.randint(3, shape.vocab, (group_size, completion), generator=g).to(device)
    ones = lambda x: torch.ones_like(x)
    advantages = torch.randn(group_size, generator=g).to(device)

    saved: dict[int, int] = {}  # storage address -> bytes: a tensor saved by several ops counts once

    def count(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):  # weights are not activations
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def update_pass() -> None:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            logps = completion_logprobs(engine, prompt_ids, ones(prompt_ids), completion_ids, ones(completion_ids),
                                        group_size)
        engine.backward(-(torch.exp(logps - logps.detach()) * advantages[:, None]).mean())

    start = time.perf_counter()
    peak = cpu_peak_mib(update_pass) if device.type == "cpu" else cuda_peak_mib(update_pass, device)
    result = {"peak_mib": peak, "activation_mib": sum(saved.values()) / 2**20, "seconds": time.perf_counter() - start}
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    end_process()


def launch(preset: Preset, prompt: int, sp: int, out: Path) -> list[dict]:
    """This module's worker on as many ranks as the largest SP size (SP = 1 is then data parallel, so every size
    runs under the same ZeRO-3 sharding); each rank's {peak_mib, activation_mib, seconds}."""
    ranks = max(preset.sizes)
    result = out / f"sp{sp}_p{prompt}.json"
    port = free_port()  # other launches may run beside this one
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks), "--master_port", str(port),
           "--module", "benchmarks.bench_sequence_parallel", "--worker", preset.shape, preset.dtype,
           str(prompt), str(preset.completion), str(preset.group_size), str(sp), str(result)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    remove_shm_buffers(port)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(run.stdout + run.stderr)[-4000:]}")
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------------- the table
def run(preset: Preset, out: Path) -> list[dict]:
    rows = []
    for prompt in preset.prompts:
        for sp in preset.sizes:
            ranks = launch(preset, prompt, sp, out)
            rows.append({"prompt": prompt, "sp": sp, "peak_mib": max(r["peak_mib"] for r in ranks),
                         "activation_mib": max(r["activation_mib"] for r in ranks),
                         "seconds": statistics.median(r["seconds"] for r in ranks)})
    return rows


def table(preset: Preset, rows: list[dict]) -> str:
    base = {r["prompt"]: r for r in rows if r["sp"] == 1}
    lines = [f"shape {preset.shape}, {preset.dtype}, G = {preset.group_size}, S = {preset.completion}; per rank (the "
             "largest rank): activation memory = bytes autograd saved for backward during the log-prob forward; peak "
             "= peak memory of the whole update pass above what was resident before it", "",
             "| P | SP | activations (MiB) | vs SP = 1 | peak (MiB) | vs SP = 1 | pass time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get(r["prompt"])
        ratio = lambda key: f"{r[key] / b[key]:.2f}" if b else "-"
        lines.append(f"| {r['prompt']} | {r['sp']} | {r['activation_mib']:.0f} | {ratio('activation_mib')} | "
                     f"{r['peak_mib']:.0f} | {ratio('peak_mib')} | {r['seconds']:.1f} |")
    lines += ["", f"Longest measured P within {preset.budget_mib:.0f} MiB per rank:", ""]
    for sp in preset.sizes:
        fits = [r["prompt"] for r in rows if r["sp"] == sp and r["peak_mib"] <= preset.budget_mib]
        lines.append(f"- SP = {sp}: {max(fits) if fits else 'none of those measured'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="ci")
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        shape, dtype, prompt, completion, group_size, sp, out = args.worker
        return worker(shape, dtype, int(prompt), int(completion), int(group_size), int(sp), out)
    preset, out = PRESETS[args.preset], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(preset, run(preset, out))
    (out / f"sequence_parallel_{args.preset}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
