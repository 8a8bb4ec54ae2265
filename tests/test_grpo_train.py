"""launch/train.py end to end: a short two-rank run through the real deepspeed launcher, and fast refusals."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_deepspeed

KEYS = {"step", "reward_mean", "reward_std", "loss", "kl", "clip_frac", "tokens_per_s", "prefix_tokens_saved",
        "step_time_s", "world_size"}
TINY = ["--prompt_length", "48", "--num_generations", "4", "--max_new_tokens", "3", "--prompts_per_device", "2"]


@pytest.mark.distributed
def test_short_two_rank_run_writes_metrics_checkpoint_export_and_plot(tmp_path):
    out = tmp_path / "run"
    result = run_deepspeed(
        "launch/train.py", "--ds_config", "ds_configs/zero3_cpu.json", "--output_dir", str(out),
        "--max_steps", "4", "--save_steps", "2", "--beta", "0.04", "--num_iterations", "2", *TINY,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["kl"] == 0.0  # the reference starts as the policy, and the first step's learning rate is 0
    for r in rows:
        assert KEYS <= r.keys()
        assert r["world_size"] == 2
        assert all(isinstance(r[k], (int, float)) and r[k] == r[k] for k in KEYS)
        assert r["prefix_tokens_saved"] > 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_4"
    assert (out / "checkpoints" / "step_2").is_dir()
    assert (out / "export" / "config.json").is_file() and (out / "export" / "model.safetensors").is_file()
    assert (out / "reward.png").stat().st_size > 0
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tensorboard"))


def train_fails_with(tmp_path, *args: str) -> str:
    """Run launch/train.py in one process; it must exit non-zero. Returns its stderr."""
    result = subprocess.run(
        [sys.executable, "launch/train.py", "--ds_config", "ds_configs/zero3_cpu.json",
         "--output_dir", str(tmp_path / "out"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert not (tmp_path / "out").exists(), "failed after starting work"
    return result.stderr


def test_missing_dataset_file_fails_fast(tmp_path):
    assert "--dataset '/nonexistent/data.jsonl' does not exist" in train_fails_with(
        tmp_path, "--dataset", "/nonexistent/data.jsonl")


def test_dataset_row_without_prompt_fails_fast(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"question": "2+2=", "answer": "4"}\n')
    assert "row 1: missing or empty 'prompt'" in train_fails_with(tmp_path, "--dataset", str(data))


def test_group_size_below_two_fails_fast_for_grpo(tmp_path):
    assert "--num_generations must be >= 2 for --advantage grpo" in train_fails_with(
        tmp_path, "--num_generations", "1")


def test_prompt_longer_than_the_model_fails_fast(tmp_path):
    err = train_fails_with(tmp_path, "--prompt_length", "5000")
    assert "exceeds the model's max_position_embeddings (4096)" in err


def test_unknown_reward_function_fails_fast(tmp_path):
    assert "cannot import module 'nowhere'" in train_fails_with(tmp_path, "--reward_fn", "nowhere:score")


def test_ds_config_batch_size_contradicting_arguments_fails_fast(tmp_path):
    config = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 16
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    err = train_fails_with(tmp_path, "--ds_config", str(path), "--prompts_per_device", "2")
    assert "train_micro_batch_size_per_gpu is 16 in the config but the arguments give 2" in err


@pytest.mark.distributed
def test_trains_a_local_hf_model_directory_on_a_jsonl_file_after_a_supervised_warmup(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from pg_deepspeed.presets import preset_config
    from pg_deepspeed.tokenizer import build_char_tokenizer

    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(preset_config("tiny-llama")).save_pretrained(model_dir)
    build_char_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": a + b}) + "\n" for a in range(9) for b in range(4)))
    out = tmp_path / "run"
    result = run_deepspeed(
        "launch/train.py", "--ds_config", "ds_configs/zero3_cpu.json", "--model", str(model_dir),
        "--dataset", str(data), "--reward_fn", "numeric_match", "--output_dir", str(out), "--max_steps", "2",
        "--num_generations", "2", "--max_new_tokens", "3", "--prompts_per_device", "2", "--sft_warmup_steps", "2",
        "--no_export",
    )
    assert result.returncode == 0, result.stdout[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["world_size"] == 2
