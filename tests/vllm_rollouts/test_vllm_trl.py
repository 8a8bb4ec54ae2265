"""TRL's colocate mode with `PrefixGroupedGRPOTrainer`: three `train()` steps on CPU with vLLM's CPU build, the
weights synced through vLLM's in-place reload (TRL 1.16's own sync fails on that build: see
pg_deepspeed/integrations/trl.py). Run by `make test-vllm`; skipped without vLLM or TRL."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: `make test-vllm` runs these tests in .venv-vllm")
pytest.importorskip("trl", reason="TRL is not installed: pip install -e '.[trl]'")

from conftest import REPO  # noqa: E402

# vLLM serves a float32 checkpoint in bfloat16 when not told otherwise (its dtype "auto"), and TRL 1.16 does not tell
# it: the sampler's log-probs then differ from the float32 trainer's by bf16 rounding (measured: mean 5e-4, max 1.8e-3)
BF16_SCALE = 5e-3


def test_three_colocated_steps_sample_with_synced_weights_and_train(tmp_path):
    # a process of its own, without this session's process-group variables (test_vllm_engine.py sets them here)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK")}
    run = subprocess.run([sys.executable, "tests/vllm_rollouts/trl_colocate.py", str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    result = json.loads((tmp_path / "result.json").read_text())
    steps = [row for row in result["log_history"] if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3]
    for row in steps:
        assert 0 < row["sampling/sampling_logp_difference/mean"] < BF16_SCALE  # fresh weights, bf16 engine
        assert row["sampling/sampling_logp_difference/max"] < 10 * BF16_SCALE
    assert result["moved"] > 1e-3  # the three steps trained (TRL syncs before each generation)
