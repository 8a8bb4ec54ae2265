"""Rollout (prefill + sampling G completions per prompt): the shared-prefix cache, the repeated cache, stock generate
and the colocated vLLM engine.

    python -m benchmarks.bench_rollout --preset cpu      # CPU, fp32, tiny shape, P 2048 (a quarter of the issue's)
    python -m benchmarks.bench_rollout --preset issue    # the issue's shape: P 8192, G 16, 128 tokens (~12 GB free RAM)
    python -m benchmarks.bench_rollout --preset h100     # CUDA, bf16, Qwen2.5-1.5B shape, P 8192, G 16, 128 tokens
    python -m benchmarks.bench_rollout --preset smoke    # seconds; run by tests/test_bench.py

Variants, on the same random weights and prompts (B prompts of exactly P tokens, no EOS: every sample makes T):
  shared  `generation.sampling.generate(cache="shared")`: each prompt's K/V once per group
          (pg_deepspeed/generation/shared_prefix_cache.py)
  repeat  `generation.sampling.generate(cache="repeat")`: one prefill per prompt, its cache repeated G times
  (both prefill in chunks of --prefill-chunk tokens across the B prompts, 2048 by default, as the trainer does)
  stock   `model.generate(num_return_sequences=G, do_sample=True)` on the unpatched model (it prefills each prompt G
          times: the expansion happens before the prefill)
  vllm    the trainer's vLLM engine (`generation.vllm_engine.VLLMEngine`: in this process, prefix caching on, n = G,
          the sampled tokens' log-probs returned) started from the shape's config, the same random weights loaded in
          place as the trainer syncs them; its prefix cache is reset before every pass (each pass prefills its
          prompts, as a training step after a weight sync does). Compiled (torch.compile) unless --vllm-eager.
          Skipped with a note when vLLM is not installed. Its KV cache is a pool allocated when the engine starts
          (--vllm-kv-mib, by default the K/V of B·G·(P+T) tokens in whole blocks: enough that it never has to
          preempt); the engine's start (including the compile) is timed on its own, `start s`.
Each (variant, B) runs in a fresh subprocess, one after another: a small warm-up pass (P 16, T 2: lazy imports and
kernels' first-call buffers, not counted), then one pass measuring peak memory
(`pg_deepspeed.distributed.peak_memory.PeakMemory`: peak RSS above the start on CPU, max allocated above the start on CUDA) and the K/V bytes its decode cache holds at
the end, then `repeats` timed passes give the median seconds; tokens/s = B·G·T / median.
vllm's memory: its KV pool is resident from the engine's start, before any pass, so its `peak MiB` is the pass's peak
(as above) plus the pool (`reserved MiB`), and its `K/V MiB` is the most KV blocks in use at once during the memory
pass (read from vLLM's block pool after every scheduler step) times the block's bytes.
`CPU s / s` is the process's CPU time over the wall time of the timed passes (the threads it really used).
Writes <out>/bench_rollout.{md,csv,png}.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pg_deepspeed.generation.sampling import DEFAULT_PREFILL_CHUNK
from pg_deepspeed.distributed.peak_memory import PeakMemory

from .shapes import get_shape

VARIANTS = ("shared", "repeat", "stock", "vllm")
RESULT = "BENCH_RESULT "  # the probe's result line (vLLM also logs to stdout)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MiB = 2**20


@dataclass(frozen=True)
class Preset:
    device: str
    dtype: str
    shape: str
    prompt_len: int
    group_size: int
    new_tokens: int
    prompts: tuple[int, ...]
    repeats: int
    threads: int  # torch intra-op threads (0: torch's default)
    vllm_gpu_memory_utilization: float = 0.1  # vLLM's start-up check of free memory (on CPU, of the CPU memory)
    vllm_eager: bool = False  # vLLM without torch.compile: starts in seconds, decodes about 10x slower


PRESETS = {
    "cpu": Preset("cpu", "float32", "tiny", 2048, 16, 128, (1, 4), repeats=3, threads=1),
    "issue": Preset("cpu", "float32", "tiny", 8192, 16, 128, (1, 4), repeats=3, threads=1),
    "h100": Preset("cuda", "bfloat16", "1.5b", 8192, 16, 128, (1, 4), repeats=5, threads=0,
                   vllm_gpu_memory_utilization=0.5),
    "smoke": Preset("cpu", "float32", "tiny", 64, 4, 8, (2,), repeats=1, threads=1, vllm_eager=True),
}


@dataclass(frozen=True)
class Row:
    prompts: int
    prompt_len: int
    group_size: int
    new_tokens: int
    variant: str
    median_s: float
    tokens_per_s: float
    peak_mib: float
    kv_mib: float
    peak_vs_repeat: float
    speed_vs_stock: float
    start_s: float  # vllm: the engine's start (nan for the others)
    reserved_mib: float  # vllm: its KV pool, allocated at start and counted in peak_mib (0 for the others)
    cpu_per_wall: float  # CPU seconds per wall second over the timed passes


# ------------------------------------------------------------------------------------------ one variant
def build(variant: str, shape_name: str, dtype: torch.dtype, device: torch.device, P: int):
    from pg_deepspeed import patch_model

    model = get_shape(shape_name).build(dtype, device).eval()
    model.config.use_cache = True
    return model if variant == "stock" else patch_model(model, max_length=P + 1024)


def one_pass(variant: str, model, ids: torch.Tensor, G: int, T: int, seed: int, prefill_chunk: int) -> int:
    """One rollout; returns the K/V bytes its decode cache holds at the end."""
    from pg_deepspeed.generation.sampling import generate, kv_bytes

    mask = torch.ones_like(ids)
    if variant == "stock":
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                             num_return_sequences=G, max_new_tokens=T, min_new_tokens=T, pad_token_id=0,
                             use_cache=True, return_dict_in_generate=True)
        cache = getattr(out, "cache", None)  # transformers 5.24 renamed `past_key_values`
        return kv_bytes(cache if cache is not None else out.past_key_values)
    return generate(model, ids, mask, G, max_new_tokens=T, temperature=1.0, top_p=1.0, eos_id=-1, pad_id=0,
                    generator=torch.Generator().manual_seed(seed), cache=variant,
                    prefill_chunk=prefill_chunk).cache_bytes


# ------------------------------------------------------------------------------------------ the vLLM engine
def kv_bytes_per_token(shape_name: str, dtype: torch.dtype) -> int:
    """K and V of one token over all layers, in bytes."""
    shape = get_shape(shape_name)
    return shape.layers * 2 * shape.kv_heads * shape.head_dim * torch.finfo(dtype).bits // 8


POOL_BLOCK = 128  # tokens: vLLM's KV block on CPU, a multiple of its usual 16 on GPUs


def vllm_pool_bytes(args: argparse.Namespace, dtype: torch.dtype) -> int:
    """The KV pool the vllm variant gets: --vllm-kv-mib, or B·G sequences of P + T tokens in whole blocks of
    POOL_BLOCK tokens, and vLLM's null block: enough that it never waits for blocks, whatever it shares."""
    if args.vllm_kv_mib:
        return int(args.vllm_kv_mib * MiB)
    blocks = args.batch * args.group_size * math.ceil((args.prompt_len + args.new_tokens) / POOL_BLOCK)
    return (blocks + 1) * POOL_BLOCK * kv_bytes_per_token(args.shape, dtype)


class VLLMVariant:
    """The trainer's engine on the benchmark's model: started from the shape's config, the model's weights loaded in
    place, and the most KV blocks in use at once recorded after every scheduler step."""

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> None:
        import torch.distributed as dist

        from pg_deepspeed.generation.vllm_engine import VLLMEngine, vllm_model_dir

        with socket.socket() as s:  # a free port for the one-rank process group vLLM's external launcher runs on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                           "LOCAL_RANK": "0"})
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override the pool's size on CPU
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        dtype = DTYPES[args.dtype]
        self.pool_bytes = vllm_pool_bytes(args, dtype)
        self.engine = VLLMEngine(vllm_model_dir(model.config, args.shape), dtype=args.dtype,
                                 max_model_len=args.prompt_len + args.new_tokens,
                                 gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                                 enforce_eager=args.vllm_eager, kv_cache_memory_bytes=self.pool_bytes)
        with self.engine.weight_update() as load:
            load(model.named_parameters())
        scheduler = self.engine.llm.llm_engine.engine_core.engine_core.scheduler
        self.block_bytes = scheduler.cache_config.block_size * kv_bytes_per_token(args.shape, dtype)
        pool = scheduler.kv_cache_manager.block_pool
        self.most_blocks = 0
        schedule = scheduler.schedule

        def counted_schedule(*a, **k):
            out = schedule(*a, **k)
            self.most_blocks = max(self.most_blocks, pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
            return out

        scheduler.schedule = counted_schedule  # instruments vLLM's own scheduler; changes nothing it does

    def one_pass(self, ids: torch.Tensor, G: int, T: int, seed: int) -> int:
        """One rollout of ids [B, P] (prefix cache emptied first); returns the most KV bytes in use at once."""
        if not self.engine.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache")
        self.most_blocks = 0
        out = self.engine.generate(ids, torch.ones_like(ids), G, max_new_tokens=T, temperature=1.0, top_p=1.0,
                                   eos_id=None, pad_id=0, seed=seed)
        made = out.completion_mask.sum(1)
        if not bool((made == T).all()):
            raise RuntimeError(f"vLLM made {made.tolist()} tokens, not {T} each")
        return self.most_blocks * self.block_bytes


# ------------------------------------------------------------------------------------------ the probe
@torch.no_grad()
def probe(args: argparse.Namespace) -> dict:
    """Runs in its own process: peak memory of the first pass, then the timed passes."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = build("stock" if args.probe == "vllm" else args.probe, args.shape, dtype, device, args.prompt_len)
    vocab = get_shape(args.shape).vocab
    ids = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    start_s, reserved = float("nan"), 0
    if args.probe == "vllm":
        variant = VLLMVariant(args, model, device)
        start_s, reserved = variant.engine.start_time_s, variant.pool_bytes
        run = lambda batch, G, T, seed: variant.one_pass(batch, G, T, seed)
    else:
        run = lambda batch, G, T, seed: one_pass(args.probe, model, batch, G, T, seed, args.prefill_chunk)
    # warm-up: first-call costs out of the measured peak
    run(ids[:1, :16], 2, 2, 0)
    with PeakMemory(device) as peak:
        kv = run(ids, args.group_size, args.new_tokens, 0)
    times, cpu = [], 0.0
    for rep in range(args.repeats):
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        run(ids, args.group_size, args.new_tokens, rep + 1)
        sync()
        times.append(time.perf_counter() - t0)
        cpu += time.process_time() - c0
    return {"peak_bytes": peak.bytes + reserved, "kv_bytes": kv, "times": times, "start_s": start_s,
            "reserved_bytes": reserved, "cpu_per_wall": cpu / sum(times)}


def run_probe(args: argparse.Namespace, variant: str, B: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_rollout", "--probe", variant, "--batch", str(B),
           "--device", args.device, "--dtype", args.dtype, "--shape", args.shape, "--prompt-len", str(args.prompt_len),
           "--group-size", str(args.group_size), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--prefill-chunk", str(args.prefill_chunk),
           "--vllm-gpu-memory-utilization", str(args.vllm_gpu_memory_utilization),
           "--vllm-kv-mib", str(args.vllm_kv_mib)]
    cmd.append("--vllm-eager" if args.vllm_eager else "--no-vllm-eager")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if result.returncode != 0:
        raise RuntimeError(f"{variant} B={B} failed:\n{result.stderr[-3000:]}")
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT)]
    if not lines:
        raise RuntimeError(f"{variant} B={B} printed no result:\n{result.stdout[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


# ------------------------------------------------------------------------------------------ the table
def run_all(args: argparse.Namespace) -> list[Row]:
    rows = []
    for B in args.prompts:
        measured = {}
        for variant in args.variants:
            measured[variant] = run_probe(args, variant, B)
            m = measured[variant]
            start = f", engine start {m['start_s']:.1f} s" if variant == "vllm" else ""
            print(f"B={B} {variant}: peak {m['peak_bytes'] / MiB:.1f} MiB, times {[round(t, 3) for t in m['times']]} "
                  f"s, CPU s / s {m['cpu_per_wall']:.2f}{start}", flush=True)
        tokens = B * args.group_size * args.new_tokens
        median = {v: statistics.median(m["times"]) for v, m in measured.items()}
        for v, m in measured.items():
            repeat_peak = measured.get("repeat", {}).get("peak_bytes", 0)
            peak_ratio = m["peak_bytes"] / repeat_peak if repeat_peak > 0 else float("nan")
            speed = median["stock"] / median[v] if "stock" in median else float("nan")
            rows.append(Row(B, args.prompt_len, args.group_size, args.new_tokens, v, median[v], tokens / median[v],
                            m["peak_bytes"] / MiB, m["kv_bytes"] / MiB, peak_ratio, speed, m["start_s"],
                            m["reserved_bytes"] / MiB, m["cpu_per_wall"]))
    return rows


def format_table(rows: list[Row]) -> str:
    head = ("B", "P", "G", "T", "variant", "median s", "tokens/s", "peak MiB", "K/V MiB", "peak / repeat",
            "tokens/s x stock", "start s", "reserved MiB", "CPU s / s")

    def cell(x) -> str:
        if not isinstance(x, float):
            return str(x)
        return "—" if math.isnan(x) else f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in asdict(r).values()) + " |" for r in rows])


def plot(rows: list[Row], path: Path, title: str) -> bool:
    """Peak memory and tokens/s per variant and B, side by side; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    batches = sorted({r.prompts for r in rows})
    variants = [v for v in VARIANTS if any(r.variant == v for r in rows)]
    width = 0.8 / len(variants)
    for ax, field, label in ((axes[0], "peak_mib", "peak MiB"), (axes[1], "tokens_per_s", "tokens/s")):
        for i, v in enumerate(variants):
            values = [next(getattr(r, field) for r in rows if r.prompts == b and r.variant == v) for b in batches]
            ax.bar([j + i * width for j in range(len(batches))], values, width, label=v)
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(batches))], [f"B={b}" for b in batches])
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def header(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads or 'default'} threads"
    return "\n".join([
        "# Rollout: prefill + G sampled completions per prompt",
        f"device: {where}; dtype {args.dtype}; shape {args.shape} {get_shape(args.shape)}",
        f"torch {torch.__version__}; P {args.prompt_len}, G {args.group_size}, T {args.new_tokens} new tokens; "
        f"prefill chunk {args.prefill_chunk or 'whole'} tokens (shared, repeat); "
        f"median of {args.repeats} after a memory pass; load average " + "/".join(f"{x:.2f}" for x in os.getloadavg()),
        f"peak memory: {PeakMemory.method(device)} (the first pass of a fresh process per variant); vllm: that "
        "plus its KV pool (reserved MiB), allocated at the engine's start; its K/V MiB: the most KV blocks in use at "
        "once during that pass",
        vllm_line(args),
        f"command: python -m benchmarks.bench_rollout {' '.join(sys.argv[1:])}",
    ])


def vllm_line(args: argparse.Namespace) -> str:
    """One line: the vLLM version and engine settings of the vllm variant, or why it was skipped."""
    if args.vllm_skipped:
        return f"vllm: skipped ({args.vllm_skipped})"
    if "vllm" not in args.variants:
        return "vllm: not asked for"
    import importlib.metadata as md

    versions = []
    for distribution in ("vllm", "vllm-cpu"):
        try:
            versions.append(f"{distribution} {md.version(distribution)}")
        except md.PackageNotFoundError:
            pass
    pool = f"{args.vllm_kv_mib} MiB" if args.vllm_kv_mib else "the K/V of B·G·(P+T) tokens in whole blocks"
    return (f"vllm: {', '.join(versions) or 'vllm'}; {'eager' if args.vllm_eager else 'compiled'}; prefix caching "
            f"on; KV pool {pool}; gpu_memory_utilization {args.vllm_gpu_memory_utilization}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--shape")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--group-size", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--prompts", type=int, nargs="+")
    p.add_argument("--repeats", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help="shared/repeat: prompt tokens per prefill forward, B prompts together (0 = whole); "
                   "stock prefills whole")
    p.add_argument("--vllm-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="vllm: enforce_eager (no torch.compile; starts in seconds, decodes slower; the smoke "
                   "preset's default)")
    p.add_argument("--vllm-gpu-memory-utilization", type=float)
    p.add_argument("--vllm-kv-mib", type=float, default=0.0,
                   help="vllm: its KV pool in MiB (0: the K/V of B·G·(P+T) tokens in whole blocks)")
    p.add_argument("--out", type=Path, default=Path("outputs/bench"))
    p.add_argument("--probe", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in vars(PRESETS[args.preset]).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("prompt_len", "group_size", "new_tokens", "repeats"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if min(args.prompts) < 1:
        raise SystemExit(f"--prompts must be >= 1, got {args.prompts}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    args.vllm_skipped = None
    if "vllm" in args.variants and not args.probe:
        from pg_deepspeed.generation.vllm_engine import vllm_missing

        args.vllm_skipped = vllm_missing()
        if args.vllm_skipped:
            print(f"note: the vllm variant is skipped: {args.vllm_skipped}", flush=True)
            args.variants = [v for v in args.variants if v != "vllm"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        print(RESULT + json.dumps(probe(args)), flush=True)
        return
    print(header(args), flush=True)
    rows = run_all(args)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bench_rollout.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    table = format_table(rows)
    (args.out / "bench_rollout.md").write_text(header(args) + "\n\n" + table + "\n")
    plotted = plot(rows, args.out / "bench_rollout.png", f"{args.shape}, {args.dtype}, {args.device}, "
                   f"P {args.prompt_len}, G {args.group_size}, T {args.new_tokens}")
    print("\n" + table)
    print(f"\nwrote {args.out}/bench_rollout.csv, .md" + (", .png" if plotted else " (no plot: matplotlib missing)"))


if __name__ == "__main__":
    main()
