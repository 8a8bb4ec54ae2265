"""`--rollout_engine vllm` end to end: launch/train.py through the real deepspeed launcher, two CPU ranks, ZeRO-3
(ds_configs/zero3_cpu.json), one vLLM engine (vllm-cpu, eager) per rank; and the refusals, one line each before any
work. Run by `make test-vllm`; skipped where vLLM is not installed."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: `make test-vllm` runs these tests in .venv-vllm")

from conftest import REPO, run_deepspeed  # noqa: E402

ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache per engine (else a share of the machine's memory)
    "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "dist"), os.environ.get("PYTHONPATH", "")]),
}
# tiny-qwen2, 2 prompts x 4 samples per rank, 8 new tokens; a reward that varies between samples (non-zero
# advantages) and a learning rate from the first step, so the policy moves at every step
ARGS = ["--ds_config", "ds_configs/zero3_cpu.json", "--rollout_engine", "vllm", "--vllm_enforce_eager",
        "--prompt_length", "48", "--curriculum_start_length", "0", "--num_generations", "4", "--max_new_tokens", "8",
        "--prompts_per_device", "2", "--reward_fn", "varied_reward:digit_share", "--learning_rate", "1e-2",
        "--warmup_steps", "0", "--log_completions_steps", "1"]
FP32_BOUND = 1e-3  # the float32 default of --max_rollout_logprob_diff
# the three-step run and its resumed twin also weight the loss by truncated importance ratios (off by default)
TIS = ["--rollout_importance_correction", "--rollout_importance_cap", "2.0"]


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def completions(out, step: int) -> list[dict]:
    return [r for r in map(json.loads, (out / "completions.jsonl").read_text().splitlines()) if r["step"] == step]


def fp32_weights(run, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=tag)


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm") / "run"
    result = run_deepspeed("launch/train.py", *ARGS, *TIS, "--max_steps", "3", "--save_steps", "1",
                           "--eval_examples", "4", "--output_dir", str(out), env=ENV)
    assert result.returncode == 0, result.stdout[-6000:]
    return out, result.stdout


@pytest.mark.distributed
def test_three_steps_sample_the_policy_being_trained(three_steps):
    out, stdout = three_steps
    assert "[pg_deepspeed] vLLM engines started in" in stdout and "tensor parallel size 1" in stdout
    metrics = rows(out)
    assert [r["step"] for r in metrics] == [0, 1, 2, 3]  # the held-out evaluation before the first step, then 3
    assert all(0 <= r["eval/accuracy"] <= 1 for r in (metrics[0], metrics[3]))  # greedy, sampled by the engine
    metrics = metrics[1:]
    for r in metrics:
        assert 0 <= r["rollout_logprob_diff_mean"] <= r["rollout_logprob_diff_max"]
        assert r["rollout_logprob_diff_mean"] < FP32_BOUND
        assert all(math.isfinite(r[k]) for k in ("reward_mean", "loss", "kl", "rollout_logprob_diff_max"))
    for r in metrics[1:]:  # after an update (step 1's weights were synced for the evaluation before it)
        assert r["weight_sync_bytes"] > 0 and r["weight_sync_peak_mem_bytes"] >= 0
    assert any(r["reward_std"] > 0 for r in metrics)  # advantages were not all zero
    for r in metrics:  # truncated importance sampling: in float32 with a correct sync every ratio is 1 to rounding
        assert abs(r["rollout_is_ratio_mean"] - 1) < 1e-5 and r["rollout_is_ratio_max"] < 1 + 1e-5
        assert r["rollout_is_capped_frac"] == 0
    assert len(completions(out, 3)) == 2 * 2 * 4  # every replica's samples


@pytest.mark.distributed
def test_the_policy_moved_and_the_engine_followed(three_steps):
    """The weights the third step ended on differ from the first step's, and the third step's samples still agree
    with the trainer (checked above): the engine had the moved weights, not the first ones."""
    out, _ = three_steps
    first, last = fp32_weights(out, "step_1"), fp32_weights(out, "step_3")
    moved = max((last[k] - first[k]).abs().max().item() for k in first)
    assert moved > 1e-3
    export = out / "export" / "model.safetensors"
    assert export.is_file()


@pytest.mark.distributed
def test_a_sync_that_misses_one_weight_stops_the_run_naming_it(tmp_path):
    """The test hook leaves one projection out of every sync: that layer keeps vLLM's dummy weights."""
    out = tmp_path / "run"
    result = run_deepspeed("launch/train.py", *ARGS, "--max_steps", "2", "--output_dir", str(out),
                           env={**ENV, "PG_DEEPSPEED_VLLM_SKIP_SYNC": "model.layers.1.mlp.down_proj.weight"})
    assert result.returncode != 0
    assert "StaleRolloutError: step 1: vLLM's log-probs of its samples differ from the policy's" in result.stdout
    assert "the weight sync to the vLLM engine did not give it the policy's weights" in result.stdout
    assert not (out / "metrics.jsonl").exists() or rows(out) == []  # stopped before the update and the log


@pytest.mark.distributed
def test_a_resumed_run_samples_what_the_uninterrupted_run_sampled(three_steps, tmp_path):
    """Same seed; the uninterrupted run as if it had stopped after step 2 (its step_2 checkpoint, written under the
    same 3-step schedule, and its logs up to step 2) resumes: step 3's completions are the uninterrupted run's (vLLM's
    seeds come from the run's seed, the step and the replica)."""
    uninterrupted, _ = three_steps
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out, ignore=shutil.ignore_patterns("step_3", "export"))
    (out / "checkpoints" / "latest").write_text("step_2")
    for log in ("metrics.jsonl", "completions.jsonl"):
        kept = [line for line in (out / log).read_text().splitlines(True) if json.loads(line)["step"] <= 2]
        (out / log).write_text("".join(kept))
    resumed = run_deepspeed("launch/train.py", *ARGS, *TIS, "--max_steps", "3", "--save_steps", "1", "--no_export",
                            "--eval_examples", "4", "--resume", "--output_dir", str(out), env=ENV)
    assert resumed.returncode == 0, resumed.stdout[-6000:]
    assert "resumed from step 2" in resumed.stdout
    assert [r["completion"] for r in completions(out, 3)] == [r["completion"] for r in completions(uninterrupted, 3)]


@pytest.mark.distributed
def test_one_engine_over_both_ranks_samples_what_an_engine_per_rank_samples(three_steps, tmp_path):
    """--vllm_tensor_parallel_size 2: the two ranks share one engine (half of each layer on each), which samples both
    ranks' prompts. Step 1 (the initial weights, the same seeds) samples the per-rank engines' completions, and the
    sharded engine stays fresh through the updates."""
    per_rank, _ = three_steps
    out = tmp_path / "run"
    result = run_deepspeed("launch/train.py", *ARGS, *TIS, "--vllm_tensor_parallel_size", "2", "--max_steps", "2",
                           "--eval_examples", "4", "--no_export", "--output_dir", str(out), env=ENV)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "tensor parallel size 2" in result.stdout
    metrics = rows(out)
    assert [r["step"] for r in metrics] == [0, 1, 2]
    assert all(r["rollout_logprob_diff_mean"] < FP32_BOUND for r in metrics[1:]), metrics
    assert [r["completion"] for r in completions(out, 1)] == [r["completion"] for r in completions(per_rank, 1)]
    assert not list(Path("/dev/shm").glob("*-cpushm_*"))  # the trainer leaves with os._exit: nothing left behind


@pytest.mark.distributed
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_a_moe_model_syncs_its_experts(tmp_path, family):
    """A tiny MoE (4 experts, top 2) through the real sync: transformers 5 holds each layer's experts fused (and
    renames Mixtral's block_sparse_moe), vLLM reads the checkpoint's per-expert names, and on CPU prepacks them. Two
    steps under the float32 bound (without the re-prepacking the first step stops at a mean of 0.0099)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pg_deepspeed.demo.char_tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_char_tokenizer

    model_dir = tmp_path / family
    experts = {"num_experts": 4} if family == "qwen3_moe" else {"num_local_experts": 4}
    config = AutoConfig.for_model(family, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                  num_experts_per_tok=2, vocab_size=VOCAB_SIZE, max_position_embeddings=256,
                                  bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, **experts)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    build_char_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "run"
    result = run_deepspeed("launch/train.py", *ARGS, "--model", str(model_dir), "--max_steps", "2", "--no_export",
                           "--output_dir", str(out), env=ENV)
    assert result.returncode == 0, result.stdout[-6000:]
    metrics = rows(out)
    assert [r["step"] for r in metrics] == [1, 2]
    assert all(r["rollout_logprob_diff_mean"] < FP32_BOUND for r in metrics), metrics


def train_fails_with(tmp_path, *args: str) -> str:
    """launch/train.py in one process: exit status 2 before any work, one error line, no traceback."""
    result = subprocess.run(
        [sys.executable, "launch/train.py", "--ds_config", "ds_configs/zero3_cpu.json",
         "--output_dir", str(tmp_path / "out"), "--rollout_engine", "vllm", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert not (tmp_path / "out").exists(), "failed after starting work"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_sequence_parallelism_is_refused_naming_the_fix(tmp_path):
    err = train_fails_with(tmp_path, "--sequence_parallel_size", "2")
    assert "--rollout_engine vllm with --sequence_parallel_size 2" in err and "use --rollout_engine hf" in err


def test_a_tensor_parallel_size_the_ranks_cannot_take_is_refused(tmp_path):
    """One process: one rank (the rules themselves: tests/test_vllm_checks.py)."""
    err = train_fails_with(tmp_path, "--vllm_tensor_parallel_size", "2")
    assert "--vllm_tensor_parallel_size 2 does not divide the run's 1 ranks" in err
    err = train_fails_with(tmp_path, "--vllm_tensor_parallel_size", "0")
    assert "--vllm_tensor_parallel_size must be >= 1, got 0" in err


def test_a_temperature_with_top_p_whose_log_probs_vllm_cannot_return_is_refused(tmp_path):
    err = train_fails_with(tmp_path, "--temperature", "0.7", "--top_p", "0.9")
    assert "vLLM returns log-probs either before the temperature or after top-p" in err
    assert "set --temperature 1 or --top_p 1" in err


def test_the_built_in_engines_options_are_refused_beside_it(tmp_path):
    err = train_fails_with(tmp_path, "--rollout_cache", "repeat")
    assert "--rollout_cache is an option of --rollout_engine hf" in err


def test_a_model_vllm_does_not_serve_is_refused(tmp_path):
    """A Llama whose config names an architecture outside vLLM's registry (transformers builds it from model_type)."""
    from pg_deepspeed.demo.char_tokenizer import build_char_tokenizer
    from pg_deepspeed.demo.presets import preset_config
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "model"
    config = preset_config("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    build_char_tokenizer().save_pretrained(model_dir)
    saved = json.loads((model_dir / "config.json").read_text())
    saved["architectures"] = ["NotServedForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(saved))
    err = train_fails_with(tmp_path, "--model", str(model_dir), "--prompt_length", "48", "--max_new_tokens", "3")
    assert "--rollout_engine vllm: vLLM does not serve the model's architecture 'NotServedForCausalLM'" in err


def test_sleep_mode_asked_for_on_cpu_is_refused(tmp_path):
    """vLLM's CPU build has no sleep mode (its platform says so; its worker's sleep and wake only log a warning)."""
    err = train_fails_with(tmp_path, "--vllm_sleep", "on")
    assert "--vllm_sleep on: the engine sleeps on CUDA (or ROCm) GPUs only" in err
    assert "use --vllm_sleep auto or off" in err


def test_an_unknown_sleep_setting_is_refused(tmp_path):
    assert "--vllm_sleep must be one of ('auto', 'on', 'off')" in train_fails_with(tmp_path, "--vllm_sleep", "yes")
