"""Multi-turn rollouts sampled by vLLM (--rollout_engine vllm with --environment): tests/vllm_rollouts/multiturn_vllm.py
in its own process (one vLLM engine per process), SmolLM2-135M-Instruct in float32 streamed into an eager engine.
The engine's log-probs sit exactly under the loss mask and equal the trainer's there; every turn is the template's.
Run by `make test-vllm`; skipped where vLLM or the SmolLM2 directory is missing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: `make test-vllm` runs these tests in .venv-vllm")

from conftest import REPO, free_port  # noqa: E402

SMOLLM2 = Path(os.environ.get("PG_DEEPSPEED_SMOLLM2", REPO / "models" / "smollm2-135m-instruct"))
FP32_BOUND = 1e-3  # the float32 default of --max_rollout_logprob_diff (measured here: at most 5.7e-5 per token)


def test_vllm_samples_every_turn_and_its_log_probs_are_the_trainers_under_the_loss_mask(tmp_path):
    if not (SMOLLM2 / "model.safetensors").exists():
        pytest.skip(f"SmolLM2-135M-Instruct is not at {SMOLLM2}: `make smollm2` writes it (or set PG_DEEPSPEED_SMOLLM2)")
    run = subprocess.run([sys.executable, "tests/vllm_rollouts/multiturn_vllm.py", "--model", str(SMOLLM2), "--out",
                          str(tmp_path), "--port", str(free_port())], cwd=REPO, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(result["samples"]) == 4 and max(s["turns"] for s in result["samples"]) == 2
    for ids, mask, loss, vllm, trainer, sample in zip(result["completion_ids"], result["completion_mask"],
                                                      result["loss_mask"], result["rollout_logps"],
                                                      result["trainer_logps"], result["samples"]):
        assert all(lm <= m for lm, m in zip(loss, mask)) and sum(loss) > 0
        assert all(v == 0.0 for v, lm in zip(vllm, loss) if not lm)  # 0 on the template's and observation tokens
        assert all(v < 0.0 for v, lm in zip(vllm, loss) if lm)
        assert max(abs(v - t) for v, t, lm in zip(vllm, trainer, loss) if lm) < FP32_BOUND
        assert sample["completion"].count("<|im_start|>assistant\n") == sample["turns"] - 1
