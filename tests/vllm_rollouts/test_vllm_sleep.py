"""The engine's sleep mode (--vllm_sleep) through a step's cycle on a GPU: sleep frees device memory, and after waking
the weights, a full weight sync and waking the KV cache it samples the trainer's policy again. Marked `cuda`: skipped
without a GPU (vLLM's CPU build has no sleep mode); the same cycle without sleeping runs on CPU, checking the script.
Run by `make test-vllm` (and `make gpu-check`, with vLLM installed)."""
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: `make test-vllm` runs these tests in .venv-vllm")

from conftest import REPO  # noqa: E402

FP32_BOUND = 1e-5  # |trainer - vLLM| per token after a correct sync in float32 (test_vllm_engine.py)


def run_check(*args: str) -> dict:
    done = subprocess.run([sys.executable, "tests/vllm_rollouts/sleep_check.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("SLEEP_CHECK ")][-1]
    return json.loads(line[len("SLEEP_CHECK "):])


def test_the_cycle_without_sleep_keeps_the_policy():
    result = run_check("--no-sleep")
    assert result["diff_before"] < FP32_BOUND and result["diff_after"] < FP32_BOUND


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none (make gpu-check)")
def test_sleep_frees_device_memory_and_the_woken_synced_engine_samples_the_policy():
    result = run_check()
    assert result["freed_bytes"] > 0
    assert result["diff_before"] < FP32_BOUND and result["diff_after"] < FP32_BOUND
