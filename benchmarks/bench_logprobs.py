"""Forward+backward of the completion log-prob pass: the baseline, the peer and pg_deepspeed.

    python -m benchmarks.bench_logprobs --preset ci                # CPU, fp32, 4 layers, h256
    python -m benchmarks.bench_logprobs --preset h100              # CUDA, bf16, Qwen2.5-1.5B shape
    python -m benchmarks.bench_logprobs --preset gpu               # CUDA, bf16, Qwen2.5-0.5B shape, fits 24 GB
    python -m benchmarks.bench_logprobs --preset h100 --max-prompt # longest P that fits at G=16, S=1024
    python -m benchmarks.bench_logprobs --preset ci --step         # the whole GRPO update step
    python -m benchmarks.bench_logprobs --preset ci -P 64 -S 16 -G 2 4 --repeats 2 --out /tmp/bench

Variants, timed in one process, interleaved (the order rotates every repeat), after warm-ups:
  baseline  `completion_logprobs(..., prefix_grouping=False)`: each member as prompt+completion,
            packed varlen, no padding, LM head on completion positions only
  hf_sdpa   stock transformers (sdpa), members batched as [N, P+S]; the bench's lengths are equal,
            so this is also unpadded; same LM head maths, completion positions only
  peer      the `prefix-grouper` package (benchmarks/peer.py), same weights, same LM head maths
  ours      `completion_logprobs(..., prefix_grouping=True)`
Before timing, every variant's log-probs are compared with ours (fp32 must agree to 1e-4).
Writes <out>/<name>.csv, .png and .md (the table with its header) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from . import memory, report
from .flops import flop_limit
from .peer import attach_peer, peer_completion_logprobs
from .shapes import SHAPES, ModelShape, get_shape

VARIANTS = ("baseline", "hf_sdpa", "peer", "ours")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FP32_TOLERANCE = 1e-4
MAX_PROMPT_LADDER = (2048, 4096, 8192, 12288, 16384, 24576, 32768, 49152, 65536, 98304, 131072)


@dataclass(frozen=True)
class Preset:
    device: str
    dtype: str
    shape: str
    prompt_lens: tuple[int, ...]
    completion_lens: tuple[int, ...]
    group_sizes: tuple[int, ...]
    warmup: int
    repeats: int
    threads: int  # torch intra-op threads; 0 keeps torch's default


# ci pins one thread: on a shared 2-core machine two OpenMP threads wait on each other whenever
# another process takes a core, and repeats then differ by up to 10x.
PRESETS = {
    "ci": Preset("cpu", "float32", "tiny", (512, 2048), (128,), (2, 4, 8), warmup=1, repeats=3, threads=1),
    "h100": Preset("cuda", "bfloat16", "1.5b", (2048, 8192), (512,), (4, 8, 16), warmup=2, repeats=10, threads=0),
    # any CUDA GPU with 24 GB (make gpu-check runs it everywhere, h100 only on >= 70 GiB)
    "gpu": Preset("cuda", "bfloat16", "0.5b", (2048,), (256,), (4, 8), warmup=2, repeats=5, threads=0),
}


@dataclass(frozen=True)
class Batch:
    """One micro-batch as a trainer holds it: B prompts, G completions each (full length)."""

    prompt_ids: Tensor  # [B, P]
    prompt_mask: Tensor  # [B, P]
    completion_ids: Tensor  # [B*G, S]
    completion_mask: Tensor  # [B*G, S]
    group_size: int


def make_batch(vocab: int, prompts: int, P: int, S: int, G: int, device: torch.device, seed: int = 0) -> Batch:
    """Random token ids, every prompt P long and every completion S long."""
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(0, vocab, (prompts, P), generator=gen).to(device)
    completion_ids = torch.randint(0, vocab, (prompts * G, S), generator=gen).to(device)
    return Batch(
        prompt_ids, torch.ones_like(prompt_ids), completion_ids, torch.ones_like(completion_ids), G
    )


# ---------------------------------------------------------------------------------- variants
Variant = Callable[[Batch], Tensor]


def build_variants(shape: ModelShape, dtype: torch.dtype, device: torch.device, names: tuple[str, ...]):
    """name -> (model, fn(batch) -> log-probs [N, S]); every model is built from the same seed, so same weights."""
    import pg_deepspeed
    from pg_deepspeed.models.logprobs import completion_logprobs

    variants: dict[str, tuple[torch.nn.Module, Variant]] = {}
    if "baseline" in names or "ours" in names:
        model = pg_deepspeed.patch_model(shape.build(dtype, device))
        for name, grouped in (("baseline", False), ("ours", True)):
            if name in names:
                variants[name] = (model, _ours(completion_logprobs, model, grouped))
    if "hf_sdpa" in names:
        stock = shape.build(dtype, device)
        stock.set_attn_implementation("sdpa")
        variants["hf_sdpa"] = (stock, _stock(stock, _head_logprobs(stock)))
    if "peer" in names:
        peer_model = shape.build(dtype, device)
        kwargs = attach_peer(peer_model)
        variants["peer"] = (peer_model, _peer(peer_model, _head_logprobs(peer_model), kwargs))
    return {name: variants[name] for name in names}


def _ours(completion_logprobs, model, grouped: bool) -> Variant:
    def run(b: Batch) -> Tensor:
        return completion_logprobs(
            model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask, b.group_size,
            prefix_grouping=grouped,
        )

    return run


def _stock(model, head) -> Variant:
    def run(b: Batch) -> Tensor:
        if not (bool(b.prompt_mask.all()) and bool(b.completion_mask.all())):
            raise ValueError("the hf_sdpa variant batches members unpadded, so it needs every mask all ones")
        P, (N, S) = b.prompt_ids.shape[1], b.completion_ids.shape
        ids = torch.cat([b.prompt_ids.repeat_interleave(b.group_size, 0), b.completion_ids], 1)
        hidden = model.model(input_ids=ids).last_hidden_state[:, P - 1 : -1]  # row c predicts token c
        return head(hidden.reshape(N * S, -1), b.completion_ids.reshape(-1)).view(N, S)

    return run


def _peer(model, head, kwargs) -> Variant:
    def run(b: Batch) -> Tensor:
        return peer_completion_logprobs(
            model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask, b.group_size,
            head_logprobs=head, forward_kwargs=kwargs,
        )

    return run


def _head_logprobs(model: torch.nn.Module):
    """Ours's LM-head maths (chunked, checkpointed, float32) for another variant's completion rows."""
    from pg_deepspeed.models.logprobs import DEFAULT_CHUNK_SIZE, LogitTransform, chunked_head_logprobs

    head, transform = model.get_output_embeddings(), LogitTransform()

    def run(hidden: Tensor, targets: Tensor) -> Tensor:
        return chunked_head_logprobs(head, hidden, targets, transform, DEFAULT_CHUNK_SIZE, False)[0]

    return run


# ---------------------------------------------------------------------------------- one pass
def make_pass(step: bool, variants: dict) -> Callable[[str, Batch], None]:
    """The timed unit: log-probs + backward, or (step) log-probs + GRPO loss + backward + AdamW step."""
    if not step:

        def logprob_pass(name: str, b: Batch) -> None:
            logps = variants[name][1](b)
            ((logps * b.completion_mask).sum() / b.completion_mask.sum()).backward()

        return logprob_pass

    from pg_deepspeed.grpo.loss import grpo_loss

    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-7) for m, _ in variants.values()}

    def grpo_step(name: str, b: Batch) -> None:
        model, fn = variants[name]
        logps = fn(b)
        gen = torch.Generator().manual_seed(1)
        old = (logps.detach() + 0.01 * torch.randn(logps.shape, generator=gen).to(logps)) * b.completion_mask
        ref = (logps.detach() + 0.01 * torch.randn(logps.shape, generator=gen).to(logps)) * b.completion_mask
        adv = torch.randn(logps.shape[0], generator=gen).to(logps)
        loss, _ = grpo_loss(logps, old, ref, adv, b.completion_mask, epsilon=0.2, epsilon_high=0.28, beta=0.04,
                            aggregation="token-mean")
        loss.backward()
        optimizers[id(model)].step()
        optimizers[id(model)].zero_grad(set_to_none=True)

    return grpo_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_agreement(variants: dict, batch: Batch) -> dict[str, float]:
    """Max |log p - log p_ours| over valid completion tokens, per variant."""
    with torch.no_grad():
        out = {name: fn(batch).float() for name, (_, fn) in variants.items()}
    valid = batch.completion_mask.bool()
    return {name: float((lp - out["ours"])[valid].abs().max()) for name, lp in out.items() if name != "ours"}


def time_interleaved(run: Callable[[str, Batch], None], names, batch: Batch, models, device, warmup: int,
                     repeats: int) -> dict[str, list[float]]:
    """Milliseconds of every timed repeat per variant; each repeat runs every variant once, in a rotating order."""
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(warmup + repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            for m in models:
                m.zero_grad(set_to_none=True)
            _sync(device)
            t0 = time.perf_counter()
            run(name, batch)
            _sync(device)
            if rep >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


# ---------------------------------------------------------------------------------- memory
def probe_memory(args: argparse.Namespace) -> float:
    """Peak memory (MiB) of one pass of `args.probe_memory` at the single grid point in args."""
    device, dtype, shape = torch.device(args.device), DTYPES[args.dtype], get_shape(args.shape)
    variants = build_variants(shape, dtype, device, (args.probe_memory,))
    run = make_pass(args.step, variants)
    batch = make_batch(shape.vocab, args.prompts, args.prompt_lens[0], args.completion_lens[0],
                       args.group_sizes[0], device)
    if device.type == "cuda":
        return memory.cuda_peak_mib(lambda: run(args.probe_memory, batch), device)
    return memory.cpu_peak_mib(lambda: run(args.probe_memory, batch))


def _cuda_peak(run: Callable[[str, Batch], None], name: str, batch: Batch, models, device) -> float:
    """CUDA peak of one pass with no gradients held before it, as in the CPU probes."""
    for m in models:
        m.zero_grad(set_to_none=True)
    return memory.cuda_peak_mib(lambda: run(name, batch), device)


def peak_memory_cpu(args: argparse.Namespace, names: tuple[str, ...], P: int, S: int, G: int) -> dict[str, float]:
    """`probe_memory` per variant, each in a fresh interpreter so no earlier pass hides its peak.

    The probes run side by side (they are not timed, and each reads only its own process's RSS).
    """
    procs = {}
    for name in names:
        cmd = [sys.executable, "-m", "benchmarks.bench_logprobs", "--probe-memory", name, "--device", args.device,
               "--dtype", args.dtype, "--shape", args.shape, "--prompts", str(args.prompts),
               "--threads", str(args.threads),
               "-P", str(P), "-S", str(S), "-G", str(G)] + (["--step"] if args.step else [])
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       cwd=Path(__file__).resolve().parent.parent)
    peaks = {}
    for name, proc in procs.items():
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe {name} P={P} S={S} G={G} failed:\n{err[-3000:]}")
        peaks[name] = float(json.loads(out.strip().splitlines()[-1])["peak_mib"])
    return peaks


# ---------------------------------------------------------------------------------- modes
def run_grid(args: argparse.Namespace) -> list[report.Row]:
    """Time and measure every variant at every (P, S, G); prints progress and the checks."""
    device, dtype, shape = torch.device(args.device), DTYPES[args.dtype], get_shape(args.shape)
    names = tuple(args.variants)
    variants = build_variants(shape, dtype, device, names)
    run = make_pass(args.step, variants)
    models = list({id(m): m for m, _ in variants.values()}.values())
    rows = []
    for P in args.prompt_lens:
        for S in args.completion_lens:
            for G in args.group_sizes:
                batch = make_batch(shape.vocab, args.prompts, P, S, G, device)
                diffs = check_agreement(variants, batch)
                print(f"P={P} S={S} G={G} agreement, max |logp - logp_ours|: "
                      + ", ".join(f"{n} {d:.2e}" for n, d in diffs.items()), flush=True)
                if dtype == torch.float32 and any(d > FP32_TOLERANCE for d in diffs.values()):
                    raise RuntimeError(f"log-probs disagree beyond {FP32_TOLERANCE} in float32: {diffs}")
                times = time_interleaved(run, names, batch, models, device, args.warmup, args.repeats)
                ms = {n: statistics.median(t) for n, t in times.items()}
                if device.type == "cuda":
                    peak = {n: _cuda_peak(run, n, batch, models, device) for n in names}
                else:
                    peak = peak_memory_cpu(args, names, P, S, G)
                limit = flop_limit(shape, P, S, G)  # B equal groups scale both sides alike
                speedup = lambda ref, n: ms[ref] / ms[n] if ref in ms else float("nan")
                for n in names:
                    rows.append(report.Row(
                        P, S, G, n, ms[n], min(times[n]), peak[n], speedup("baseline", n), speedup("hf_sdpa", n),
                        speedup("peer", n), limit, 100.0 * speedup("baseline", n) / limit,
                    ))
                print(report.format_table(rows[-len(names):]), flush=True)
    return rows


def run_max_prompt(args: argparse.Namespace) -> dict[str, int]:
    """Longest prompt from MAX_PROMPT_LADDER whose pass fits, per variant (CUDA only)."""
    device, dtype, shape = torch.device(args.device), DTYPES[args.dtype], get_shape(args.shape)
    if device.type != "cuda":
        raise ValueError("--max-prompt needs --device cuda: on CPU running out of memory is not recoverable")
    S, G = args.completion_lens[0], args.group_sizes[0]
    longest = {}
    for name in args.variants:
        variants = build_variants(shape, dtype, device, (name,))
        run = make_pass(args.step, variants)
        longest[name] = 0
        for P in MAX_PROMPT_LADDER:
            try:
                run(name, make_batch(shape.vocab, 1, P, S, G, device))
                _sync(device)
            except torch.OutOfMemoryError:
                break
            finally:
                variants[name][0].zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
            longest[name] = P
        print(f"{name}: longest prompt that fits at G={G}, S={S}: {longest[name] or '< 2048'}", flush=True)
        del variants, run
        torch.cuda.empty_cache()
    return longest


# ---------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Preset values fill every option the command line leaves out."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="ci")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--shape", choices=sorted(SHAPES), help="model shape (random weights)")
    p.add_argument("-P", "--prompt-lens", type=int, nargs="+")
    p.add_argument("-S", "--completion-lens", type=int, nargs="+")
    p.add_argument("-G", "--group-sizes", type=int, nargs="+")
    p.add_argument("--prompts", type=int, default=1, help="prompts (groups) per micro-batch")
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--threads", type=int, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--step", action="store_true", help="time the whole GRPO update step")
    p.add_argument("--max-prompt", action="store_true",
                   help="CUDA: longest prompt that fits per variant (default G=16, S=1024)")
    p.add_argument("--out", type=Path, default=Path("outputs/bench"))
    p.add_argument("--probe-memory", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.max_prompt:
        preset = replace(preset, completion_lens=(1024,), group_sizes=(16,))
    for key, value in vars(preset).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("prompt_lens", "completion_lens", "group_sizes"):
        bad = [x for x in getattr(args, key) if x < 1]
        if bad:
            raise SystemExit(f"--{key.replace('_', '-')} must be positive, got {bad}")
    for key in ("prompts", "repeats"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.threads < 0:
        raise SystemExit(f"--threads must be >= 0, got {args.threads}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    if "ours" not in args.variants and not args.max_prompt:
        raise SystemExit("--variants must include ours (the agreement check compares against it)")
    return args


def header(args: argparse.Namespace) -> str:
    """What ran, where: printed above the table and stored with it."""
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    what = "GRPO update step (log-probs + loss + backward + AdamW)" if args.step else \
        "completion log-prob pass, forward+backward"
    return "\n".join([
        f"# {what}",
        f"device: {where}; dtype {args.dtype}; shape {args.shape} {get_shape(args.shape)}",
        f"torch {torch.__version__}; prompts per micro-batch {args.prompts}; "
        f"warm-up {args.warmup}, median of {args.repeats}; load average "
        + "/".join(f"{x:.2f}" for x in os.getloadavg()),
        f"peak memory: {memory.method(device)}",
        f"command: python -m benchmarks.bench_logprobs {' '.join(sys.argv[1:])}",
    ])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe_memory:
        print(json.dumps({"peak_mib": probe_memory(args)}))
        return
    print(header(args), flush=True)
    if args.max_prompt:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "max_prompt.json").write_text(json.dumps(run_max_prompt(args), indent=1))
        return
    rows = run_grid(args)
    name = "bench_step" if args.step else "bench_logprobs"
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(rows, args.out / f"{name}.csv")
    report.plot_speedup(rows, args.out / f"{name}.png", f"{args.shape}, {args.dtype}, {args.device}")
    table = report.format_table(rows)
    (args.out / f"{name}.md").write_text(header(args) + "\n\n" + table + "\n")
    print("\n" + table)
    print(f"\nwrote {args.out / name}.csv, .png, .md")


if __name__ == "__main__":
    main()
