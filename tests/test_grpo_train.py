"""launch/train.py end to end: two-rank runs through the real deepspeed launcher (a short run; a run killed in the
middle of a save, then resumed), and refusals that print one line."""
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MistralConfig

from conftest import DEEPSPEED, REPO, free_port, run_deepspeed
from pg_deepspeed.grpo.metrics import MetricsLogger, read_metrics
from pg_deepspeed.demo.presets import PRESETS, preset_config
from pg_deepspeed.demo.char_tokenizer import build_char_tokenizer

KEYS = {"step", "reward_mean", "reward_std", "loss", "kl", "clip_frac", "tokens_per_s", "prefix_tokens_saved",
        "step_time_s", "world_size", "rollout_time_s", "rollout_tokens_per_s", "rollout_peak_mem_bytes",
        "rollout_cache_bytes"}
SHAPE = ["--prompt_length", "48", "--num_generations", "4", "--max_new_tokens", "3", "--prompts_per_device", "2"]
TINY = [*SHAPE, "--curriculum_start_length", "0"]  # prompts of one length, and no warm-up unless asked for


@pytest.mark.distributed
def test_short_two_rank_run_writes_metrics_checkpoint_export_and_plot(tmp_path):
    """The default curriculum (16 tokens doubling to --prompt_length 48 over half the steps) and one warm-up step."""
    out = tmp_path / "run"
    result = run_deepspeed(
        "launch/train.py", "--ds_config", "ds_configs/zero3_cpu.json", "--output_dir", str(out),
        "--max_steps", "4", "--save_steps", "2", "--beta", "0.04", "--num_iterations", "2", "--sft_warmup_steps", "1",
        *SHAPE,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["prompt_length"] for r in rows] == [17, 33, 49, 49]  # BOS + the curriculum's 16, 32, 48 characters
    # the reference is the initial policy, and the supervised warm-up step trained before the first GRPO step (at the
    # warm-up's rate: DeepSpeed's own schedule had it at lr 0, and this KL at 0)
    assert rows[0]["kl"] > 0
    for r in rows:
        assert KEYS <= r.keys()
        assert r["world_size"] == 2
        assert all(isinstance(r[k], (int, float)) and r[k] == r[k] for k in KEYS)
        assert r["prefix_tokens_saved"] > 0
        assert r["rollout_tokens_per_s"] > 0 and r["rollout_cache_bytes"] > 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_4"
    assert (out / "checkpoints" / "step_2").is_dir()
    assert (out / "export" / "config.json").is_file() and (out / "export" / "model.safetensors").is_file()
    assert (out / "reward.png").stat().st_size > 0
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tensorboard"))


def train_fails_with(tmp_path, *args: str) -> str:
    """Run launch/train.py in one process; it must exit with status 2 before any work, printing one error line
    and no traceback. Returns that line."""
    result = subprocess.run(
        [sys.executable, "launch/train.py", "--ds_config", "ds_configs/zero3_cpu.json",
         "--output_dir", str(tmp_path / "out"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert not (tmp_path / "out").exists(), "failed after starting work"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_a_model_directory_without_a_model_is_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    build_char_tokenizer().save_pretrained(empty)  # a tokenizer alone is no model
    assert f"model directory '{empty}' holds no model: it has no config.json" in train_fails_with(
        tmp_path, "--model", str(empty))


def test_a_model_directory_without_weights_is_named(tmp_path):
    no_weights = tmp_path / "config-only"
    preset_config("tiny-llama").save_pretrained(no_weights)
    assert f"model directory '{no_weights}' holds no weights" in train_fails_with(tmp_path, "--model", str(no_weights))


def test_a_sliding_window_shorter_than_the_run_is_refused_before_any_work(tmp_path):
    model_dir = tmp_path / "mistral"
    save_tiny_mistral(model_dir, sliding_window=32)
    err = train_fails_with(tmp_path, "--model", str(model_dir), "--prompt_length", "48", "--max_new_tokens", "3")
    assert "cannot prefix-group" in err and "window" in err


def test_unknown_dtype_is_one_line(tmp_path):
    assert "--dtype must be one of" in train_fails_with(tmp_path, "--dtype", "float64")


@pytest.mark.parametrize("option, value", [("--rollout_cache", "paged"), ("--rollout_gather", "sometimes")])
def test_unknown_rollout_modes_are_one_line(tmp_path, option, value):
    assert f"{option} must be one of" in train_fails_with(tmp_path, option, value)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                    reason="vLLM is installed here (tests/vllm_rollouts runs it)")
def test_the_vllm_engine_without_vllm_is_one_line_naming_the_extra(tmp_path):
    err = train_fails_with(tmp_path, "--rollout_engine", "vllm")
    assert "--rollout_engine vllm: vLLM is not installed: pip install 'pg_deepspeed[vllm]'" in err


def test_an_unknown_rollout_engine_is_one_line(tmp_path):
    assert "--rollout_engine must be one of ('hf', 'vllm')" in train_fails_with(tmp_path, "--rollout_engine", "sglang")


def test_importance_correction_without_the_vllm_engine_is_one_line(tmp_path):
    err = train_fails_with(tmp_path, "--rollout_importance_correction")
    assert "--rollout_importance_correction corrects for vLLM's sampling: it needs --rollout_engine vllm" in err


def test_a_negative_prefill_chunk_is_one_line(tmp_path):
    assert "--rollout_prefill_chunk must be >= 0" in train_fails_with(tmp_path, "--rollout_prefill_chunk", "-1")


def test_missing_dataset_file_fails_fast(tmp_path):
    assert "--dataset '/nonexistent/data.jsonl' does not exist" in train_fails_with(
        tmp_path, "--dataset", "/nonexistent/data.jsonl")


def test_dataset_row_without_prompt_fails_fast(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"question": "2+2=", "answer": "4"}\n')
    assert "row 1: the prompt is missing" in train_fails_with(tmp_path, "--dataset", str(data))


def test_group_size_below_two_fails_fast_for_grpo(tmp_path):
    assert "--num_generations must be >= 2 for --advantage grpo" in train_fails_with(
        tmp_path, "--num_generations", "1")


def test_prompt_longer_than_the_model_fails_fast(tmp_path):
    err = train_fails_with(tmp_path, "--prompt_length", "5000")
    assert "exceeds the model's max_position_embeddings (4096)" in err


def test_unknown_reward_function_fails_fast(tmp_path):
    assert "cannot import module 'nowhere'" in train_fails_with(tmp_path, "--reward_fn", "nowhere:score")


def test_reward_weights_not_one_per_function_fail_fast_naming_both_options(tmp_path):
    err = train_fails_with(tmp_path, "--reward_fn", "numeric_match", "format", "--reward_weights", "0.7")
    assert "--reward_weights has 1 weight but --reward_fn names 2 functions" in err


def test_ds_config_batch_size_contradicting_arguments_fails_fast(tmp_path):
    config = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 16
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    err = train_fails_with(tmp_path, "--ds_config", str(path), "--prompts_per_device", "2")
    assert "train_micro_batch_size_per_gpu is 16 in the config but the arguments give 2" in err



def test_a_warmup_cosine_schedule_without_its_total_fails_fast_naming_it(tmp_path):
    config = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    del config["scheduler"]["params"]["total_num_steps"]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    err = train_fails_with(tmp_path, "--ds_config", str(path))
    assert f"--ds_config {path}: scheduler WarmupCosineLR: total_num_steps must be a non-negative int" in err

def save_tiny_mistral(model_dir, sliding_window: int) -> None:
    """A random-init Mistral over the char vocabulary whose window (shorter than its 4096 positions) is set."""
    config = MistralConfig(**{k: v for k, v in PRESETS["tiny-llama"].items() if k != "model_type"},
                           sliding_window=sliding_window)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    build_char_tokenizer().save_pretrained(model_dir)


@pytest.mark.distributed
def test_trains_a_local_sliding_window_model_directory_on_a_jsonl_file_after_a_supervised_warmup(tmp_path):
    model_dir = tmp_path / "model"
    save_tiny_mistral(model_dir, sliding_window=64)  # covers the run's longest prompt + completion, not 4096
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


@pytest.mark.distributed
def test_two_weighted_reward_functions_log_their_own_means_and_the_reward_is_their_weighted_sum(tmp_path):
    """numeric_match (weight 0.7) and tests/dist/column_reward.py's scaled_length (weight 0.3), which needs the
    dataset's `scale` column by keyword: each function's mean over both ranks' completions is `reward/<name>`, and reward_mean
    (what the advantages come from) is 0.7 * the first + 0.3 * the second."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": a + b, "scale": 0.5 + (a + b) % 3})
                            + "\n" for a in range(9) for b in range(4)))
    out = tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "dist"), os.environ.get("PYTHONPATH", "")])}
    result = run_deepspeed(
        "launch/train.py", "--ds_config", "ds_configs/zero3_cpu.json", "--dataset", str(data),
        "--reward_fn", "numeric_match", "column_reward:scaled_length", "--reward_weights", "0.7", "0.3",
        "--output_dir", str(out), "--max_steps", "2", "--num_generations", "4", "--max_new_tokens", "3",
        "--prompts_per_device", "2", "--no_export", env=env,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        first, second = r["reward/numeric_match"], r["reward/scaled_length"]
        assert 0.0 <= first <= 1.0 and second > 0.0  # the column reached the function: every scale is >= 0.5
        assert abs(r["reward_mean"] - (0.7 * first + 0.3 * second)) <= 1e-6, r


@pytest.mark.distributed
def test_ranks_whose_completions_need_different_head_calls_train_under_the_shipped_zero3_config(tmp_path):
    """Issue 23 item 1: under ds_configs/zero3_cpu.json each LM-head call is a ZeRO-3 gather, so ranks whose
    micro-batches hold different numbers of completion tokens used to call the head a different number of times and
    abort at step 1 ("Is there a distributed collective mismatch"). Two rows, one prompt per rank: each epoch's
    shuffle gives the ranks different rows, so the warm-up's answers (1 and 40 characters + EOS) need 1 and 11 head
    calls of 4 rows; the GRPO steps sample up to 40 tokens; --beta and --num_iterations add the reference and
    old-policy passes."""
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "2+5=", "answer": "7"}) + "\n"
                    + json.dumps({"prompt": "Spell forty:", "answer": "f-o-r-t-y " * 4}) + "\n")
    out = tmp_path / "run"
    result = run_deepspeed(
        "launch/train.py", "--ds_config", "ds_configs/zero3_cpu.json", "--dataset", str(data),
        "--reward_fn", "exact_match", "--output_dir", str(out), "--max_steps", "2", "--num_generations", "2",
        "--max_new_tokens", "40", "--prompts_per_device", "1", "--sft_warmup_steps", "2", "--beta", "0.04",
        "--num_iterations", "2", "--logprob_chunk_size", "4", "--no_export",
    )
    assert result.returncode == 0, result.stdout[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_a_logprob_chunk_below_one_is_one_line(tmp_path):
    assert "--logprob_chunk_size must be >= 1, got 0" in train_fails_with(tmp_path, "--logprob_chunk_size", "0")


# ------------------------------------------------------------------------------ conversations and chat templates
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def save_tiny_chat_model(model_dir) -> None:
    """tiny-qwen2's shape, random-init, over the char vocabulary with a ChatML-like template."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(preset_config("tiny-qwen2")).save_pretrained(model_dir)
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)


def conversation(a: int, b: int) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{a}+{b}="}]


@pytest.mark.distributed
def test_a_conversational_dataset_is_trained_through_the_chat_template_with_the_system_prompt(tmp_path):
    model_dir, data, out = tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "run"
    save_tiny_chat_model(model_dir)
    data.write_text("".join(json.dumps({"prompt": conversation(a, b), "answer": a + b}) + "\n"
                            for a in range(4) for b in range(3)))
    result = run_deepspeed(
        "launch/train.py", "--ds_config", "ds_configs/zero3_cpu.json", "--model", str(model_dir),
        "--dataset", str(data), "--system_prompt", "Answer with a number.", "--reward_fn", "numeric_match",
        "--output_dir", str(out), "--max_steps", "2", "--num_generations", "2", "--max_new_tokens", "3",
        "--prompts_per_device", "2", "--log_completions_steps", "1", "--no_export",
    )
    assert result.returncode == 0, result.stdout[-4000:]
    samples = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1] * 8 + [2] * 8  # 2 ranks x 2 prompts x G = 2, every step
    for s in samples:
        question = s["prompt"].split("<|user|>\n")[1].split("\n")[0]
        assert s["prompt"] == f"<bos><|system|>\nAnswer with a number.\n<|user|>\n{question}\n<|assistant|>\n"
        assert isinstance(s["completion"], str) and s["reward"] in (0.0, 1.0)


def test_a_malformed_conversation_is_refused_naming_its_row(tmp_path):
    data = tmp_path / "train.jsonl"
    bad = [{"role": "user", "content": "1+1="}, {"role": "robot", "content": "2"}]
    data.write_text(json.dumps({"prompt": conversation(1, 2), "answer": 3}) + "\n"
                    + json.dumps({"prompt": bad, "answer": 2}) + "\n")
    error = train_fails_with(tmp_path, "--dataset", str(data))
    assert "row 1: message 1 has role 'robot'" in error


def test_a_conversation_longer_than_the_model_is_refused_naming_its_row(tmp_path):
    model_dir, data = tmp_path / "model", tmp_path / "train.jsonl"
    save_tiny_chat_model(model_dir)
    long = [{"role": "user", "content": "9" * 4090}]
    data.write_text(json.dumps({"prompt": conversation(1, 2), "answer": 3}) + "\n"
                    + json.dumps({"prompt": long, "answer": 9}) + "\n")
    error = train_fails_with(tmp_path, "--model", str(model_dir), "--dataset", str(data))
    assert re.search(r"train.jsonl' row 1: the prompt is 41\d\d tokens; with --max_new_tokens 4 it exceeds the model's "
                     r"max_position_embeddings \(4096\)$", error), error


def test_a_conversation_on_a_model_without_a_chat_template_is_refused_naming_its_row(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": conversation(1, 2), "answer": 3}) + "\n")
    error = train_fails_with(tmp_path, "--dataset", str(data))  # the tiny preset's tokenizer has no template
    assert "row 0: a conversation needs a chat template: the tokenizer has none" in error


# ------------------------------------------------------------------------------ trackers
@pytest.mark.distributed
def test_wandb_and_tensorboard_receive_the_metrics_and_wandb_the_completions_table(tmp_path):
    """No API key and WANDB_MODE unset: the W&B run is written offline under output_dir/wandb."""
    assert not any(k.startswith("WANDB_") for k in os.environ)
    out = tmp_path / "run"
    result = run_deepspeed("launch/train.py", "--ds_config", "ds_configs/zero3_cpu.json", "--output_dir", str(out),
                           "--max_steps", "2", "--log_completions_steps", "2", "--report_to", "tensorboard", "wandb",
                           "--no_export", *TINY)
    assert result.returncode == 0, result.stdout[-4000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, result.stdout[-3000:]
    history = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"reward_mean" in history and b"prefix_tokens_saved" in history
    tables = list(runs[0].glob("files/media/table/completions_2_*.table.json"))
    table = json.loads(tables[0].read_text())
    assert table["columns"][:4] == ["step", "prompt", "completion", "reward"]
    assert len(table["data"]) == 2 * 2 * 4  # 2 ranks x 2 prompts x G = 4, at step 2
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_an_unknown_tracker_is_one_line(tmp_path):
    assert "--report_to mlflow: choose from tensorboard wandb jsonl" in train_fails_with(
        tmp_path, "--report_to", "mlflow")


# ------------------------------------------------------------------------------ held-out evaluation
@pytest.mark.distributed
def test_held_out_rows_are_evaluated_before_training_every_eval_steps_and_at_the_end(tmp_path):
    data, out = tmp_path / "train.jsonl", tmp_path / "run"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": a + b}) + "\n"
                            for a in range(4) for b in range(3)))
    result = run_deepspeed(
        "launch/train.py", "--ds_config", "ds_configs/zero3_cpu.json", "--dataset", str(data),
        "--reward_fn", "numeric_match", "--output_dir", str(out), "--max_steps", "3", "--num_generations", "2",
        "--max_new_tokens", "3", "--prompts_per_device", "2", "--eval_examples", "5", "--eval_steps", "2",
        "--log_completions_steps", "1",
    )
    assert result.returncode == 0, result.stdout[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [("eval/accuracy" in r, "eval/reward_mean" in r) for r in rows] == [(True, True), (False, False),
                                                                             (True, True), (True, True)]
    for r in rows:
        if "eval/accuracy" in r:  # 5 examples: a multiple of 1/5
            assert abs(r["eval/accuracy"] * 5 - round(r["eval/accuracy"] * 5)) < 1e-9
            assert 0.0 <= r["eval/reward_mean"] <= 1.0
    trained = {s["prompt"] for s in map(json.loads, (out / "completions.jsonl").read_text().splitlines())}
    assert len(trained) == 12 - 5  # 12 draws: every training row, and none of the 5 held out
    assert (out / "reward.png").stat().st_size > 0


# ------------------------------------------------------------------------------ a reasoning-gym task
@pytest.mark.distributed
def test_a_reasoning_gym_task_trains_on_its_indexed_examples_scored_by_its_own_scorer(tmp_path):
    """--task reasoning_gym:basic_arithmetic: each step's prompts are the task's examples at that step's indices
    (what a resume rereads), and the default reward is the task's scorer, logged as reward/reasoning_gym."""
    from pg_deepspeed.grpo.data import build_source

    out = tmp_path / "run"
    result = run_deepspeed(
        "launch/train.py", "--ds_config", "ds_configs/zero3_cpu.json", "--task", "reasoning_gym:basic_arithmetic",
        "--task_config", '{"max_terms": 3, "max_digits": 2}', "--output_dir", str(out), "--max_steps", "2",
        "--no_export", "--num_generations", "2", "--max_new_tokens", "4", "--prompts_per_device", "2",
        "--curriculum_start_length", "0", "--eval_examples", "2", "--log_completions_steps", "1",
    )
    assert result.returncode == 0, result.stdout[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert 0.0 <= r["reward/reasoning_gym"] <= 1.0
        assert abs(r["reward_mean"] - r["reward/reasoning_gym"]) <= 1e-9  # the one function, weight 1
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    task = build_source("reasoning_gym:basic_arithmetic", None, 256, seed=0,
                        task_config='{"max_terms": 3, "max_digits": 2}')
    shown = [json.loads(line)["prompt"] for line in (out / "completions.jsonl").read_text().splitlines()]
    expected = [task.example(i).prompt for i in range(8)]  # 2 steps x 2 ranks x 2 prompts, indices 0..7
    assert len(shown) == 8 * 2 and all(any(p.endswith(e) for p in shown) for e in expected), (shown, expected)


def test_a_bad_task_config_is_one_line(tmp_path):
    err = train_fails_with(tmp_path, "--task", "reasoning_gym:basic_arithmetic", "--task_config", '{"min_term": 2}')
    assert "--task_config option 'min_term': reasoning_gym:basic_arithmetic has no such option" in err


# ------------------------------------------------------------------------------ a non-finite loss
# a reward that varies between completions (tests/dist/varied_reward.py): non-zero advantages, so every step that is
# not skipped moves the weights
NONFINITE_ARGS = ["--ds_config", "ds_configs/zero3_cpu.json", "--save_steps", "1", "--no_export",
                  "--reward_fn", "varied_reward:digit_share", *TINY]
DIST_ON_PATH = os.pathsep.join([str(REPO / "tests" / "dist"), os.environ.get("PYTHONPATH", "")])


def fp32_weights(run, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=tag)


@pytest.mark.distributed
def test_a_nan_loss_on_one_rank_skips_that_step_on_every_rank_and_the_run_goes_on(tmp_path):
    """Rank 1's loss is NaN at step 3, whose lr would move the weights."""
    out = tmp_path / "run"
    result = run_deepspeed("tests/dist/nonfinite_loss.py", *NONFINITE_ARGS, "--max_steps", "4",
                           "--output_dir", str(out), env={"NAN_STEPS": "3", "PYTHONPATH": DIST_ON_PATH})
    assert result.returncode == 0, result.stdout[-4000:]
    assert "step 3, update 1: non-finite loss on some rank; optimizer step skipped on every rank" in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skips"] for r in rows] == [0, 0, 1, 0]
    # step 3 had a learning rate; the skipped step did not advance the schedule, so step 4 ran at the same rate
    assert rows[2]["lr"] > 0 and rows[3]["lr"] == rows[2]["lr"] and rows[1]["lr"] != rows[2]["lr"]
    before, skipped, after = (fp32_weights(out, f"step_{s}") for s in (2, 3, 4))
    assert all(torch.equal(skipped[k], before[k]) for k in before)  # step 3 changed no weight
    assert any(not torch.equal(after[k], skipped[k]) for k in before)  # step 4 trained again
    assert all(bool(torch.isfinite(v).all()) for v in after.values())


@pytest.mark.distributed
def test_consecutive_nan_losses_stop_the_run_before_any_checkpoint_after_them(tmp_path):
    out = tmp_path / "run"
    result = run_deepspeed("tests/dist/nonfinite_loss.py", *NONFINITE_ARGS, "--max_steps", "5",
                           "--max_nonfinite_steps", "2", "--output_dir", str(out),
                           env={"NAN_STEPS": "2,3,4,5", "PYTHONPATH": DIST_ON_PATH})
    assert result.returncode != 0
    assert "2 consecutive optimizer steps had a non-finite loss or gradient norm (--max_nonfinite_steps 2)" in (
        result.stdout)
    assert tags(out) == ["step_1", "step_2"]  # step 2 was skipped (its weights are step 1's); step 3 stopped the run
    assert all(bool(torch.isfinite(v).all()) for v in fp32_weights(out, "step_2").values())


# ------------------------------------------------------------------------------ a kill in the middle of a save
KILL_ARGS = ["--ds_config", "ds_configs/zero3_cpu.json", "--max_steps", "6", "--save_steps", "2",
             "--save_total_limit", "2", "--beta", "0.04", "--sft_warmup_steps", "2", *TINY]
TIMING_KEYS = {"tokens_per_s", "step_time_s", "rollout_time_s", "rollout_tokens_per_s", "rollout_peak_mem_bytes"}


def train_until_killed(out, marker, timeout: float = 600) -> None:
    """tests/dist/slow_save.py (the trainer, rank 1 stalling inside the save of step_4) until rank 1 is inside that
    save; then SIGKILL to the launcher's whole process group, as a node failure or `scancel --full` would."""
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), "tests/dist/slow_save.py",
           *KILL_ARGS, "--output_dir", str(out)]
    env = {**os.environ, "SLOW_SAVE_TAG": "step_4", "SLOW_SAVE_MARKER": str(marker)}
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + timeout
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # rank 0 is done with its files and waits at the barrier
    os.killpg(process.pid, signal.SIGKILL)
    output = process.communicate()[0]
    assert marker.exists(), f"rank 1 never started saving step_4:\n{output[-4000:]}"


def tags(run) -> list[str]:
    """The checkpoint directories of a run (DeepSpeed also writes its conversion scripts beside them)."""
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(("step_", "sft_")))


def metric_values(out) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """KILL_ARGS from start to end, never stopped: the trajectory every interrupted run must end on."""
    reference = tmp_path_factory.mktemp("uninterrupted")
    result = run_deepspeed("launch/train.py", *KILL_ARGS, "--output_dir", str(reference))
    assert result.returncode == 0, result.stdout[-4000:]
    return reference


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, uninterrupted_run):
    """The uninterrupted run, and the same run killed inside the save of step_4, then resumed twice (the second
    resume starts at max_steps)."""
    root = tmp_path_factory.mktemp("kill")
    reference, out = uninterrupted_run, root / "killed"
    train_until_killed(out, root / "rank1-saving")
    torn = {"latest": (out / "checkpoints" / "latest").read_text(),
            "step_4": sorted(p.name for p in (out / "checkpoints" / "step_4").iterdir())}
    # a kill while rank 0 wrote its logs: half a metrics line and a torn TensorBoard record
    with open(out / "metrics.jsonl", "a") as file:
        file.write('{"step": 5, "reward_mean": 0.')
    events = sorted((out / "tensorboard").glob("events.out.tfevents.*"))[-1]
    with open(events, "ab") as file:
        file.write(b"\x18\x00\x00\x00\x00\x00")
    resumed = run_deepspeed("launch/train.py", *KILL_ARGS, "--output_dir", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    manifest = out / "checkpoints" / "step_6" / "complete.json"
    before = manifest.stat().st_mtime_ns
    again = run_deepspeed("launch/train.py", *KILL_ARGS, "--output_dir", str(out), "--resume", "--no_export")
    assert again.returncode == 0, again.stdout[-4000:]
    return reference, out, torn, resumed.stdout, again.stdout, manifest.stat().st_mtime_ns == before


@pytest.mark.distributed
def test_a_kill_inside_a_save_leaves_the_pointer_on_the_last_complete_checkpoint(killed_and_resumed):
    _, _, torn, _, _, _ = killed_and_resumed
    assert torn["latest"] == "step_2"  # DeepSpeed alone would have written step_4 before rank 1 finished
    assert "complete.json" not in torn["step_4"]


@pytest.mark.distributed
def test_the_resume_skips_the_torn_checkpoint_saying_so(killed_and_resumed):
    _, out, _, resumed, _, _ = killed_and_resumed
    assert f"skipping checkpoint {out / 'checkpoints' / 'step_4'}: no complete.json" in resumed
    assert "resumed from step 2" in resumed


@pytest.mark.distributed
def test_the_resumed_run_logs_each_step_once_with_the_uninterrupted_values(killed_and_resumed):
    reference, out, _, _, _, _ = killed_and_resumed
    expected, got = metric_values(reference), metric_values(out)
    assert [row["step"] for row in got] == [1, 2, 3, 4, 5, 6]
    for want, have in zip(expected, got):
        assert have.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, float):
                assert have[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (want["step"], key)
            else:
                assert have[key] == value, (want["step"], key)


@pytest.mark.distributed
def test_the_resumed_run_ends_on_the_uninterrupted_weights(killed_and_resumed):
    reference, out, _, _, _, _ = killed_and_resumed
    expected = load_file(reference / "export" / "model.safetensors")
    got = load_file(out / "export" / "model.safetensors")
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert rel_err(got[name], value) <= 1e-6, name


@pytest.mark.distributed
def test_save_total_limit_keeps_the_newest_complete_checkpoints(killed_and_resumed):
    reference, out, _, _, _, _ = killed_and_resumed
    for run in (reference, out):
        assert tags(run) == ["step_4", "step_6"]
        assert (run / "checkpoints" / "latest").read_text() == "step_6"


@pytest.mark.distributed
def test_resuming_a_finished_run_writes_no_checkpoint_again(killed_and_resumed):
    _, _, _, _, again, untouched = killed_and_resumed
    assert "resumed from step 6" in again
    assert "checkpoint step_6 saved" not in again
    assert untouched


# ------------------------------------------------------------------------------ metrics.jsonl after a kill
def test_resume_drops_a_half_written_last_metrics_line_and_later_steps(tmp_path):
    rows = [{"step": s, "reward_mean": s / 10, "reward_std": 0.1, "loss": 0.5} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rew')
    MetricsLogger(str(tmp_path), rank=0, total_steps=5, start_step=2).close()
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == rows[:2]


def test_a_bad_metrics_line_before_the_last_is_an_error_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "rew\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2"):
        read_metrics(str(tmp_path / "metrics.jsonl"))


# ------------------------------------------------------------------------------ a signal inside warm-up or rollout
@pytest.fixture(scope="module")
def signalled_twice(tmp_path_factory, uninterrupted_run):
    """KILL_ARGS signalled (SIGUSR1 on rank 1) during warm-up step 1, resumed and signalled during the rollout of
    step 3, resumed again to the end. Returns (uninterrupted dir, run dir, [stdout of each of the three runs],
    [checkpoint tags after each stop])."""
    out = tmp_path_factory.mktemp("signalled") / "run"
    outputs, stops = [], []
    for during, resume in (("sft:1", []), ("rollout:3", ["--resume"]), (None, ["--resume"])):
        if during is None:
            result = run_deepspeed("launch/train.py", *KILL_ARGS, "--output_dir", str(out), *resume)
        else:
            result = run_deepspeed("tests/dist/signal_during.py", *KILL_ARGS, "--output_dir", str(out), *resume,
                                   env={"SIGNAL_DURING": during})
        assert result.returncode == 0, result.stdout[-4000:]
        outputs.append(result.stdout)
        stops.append(tags(out))
    return uninterrupted_run, out, outputs, stops


@pytest.mark.distributed
def test_a_signal_during_the_warmup_stops_after_that_warmup_step(signalled_twice):
    _, _, outputs, stops = signalled_twice
    assert "stop requested: checkpoint at warm-up step 1" in outputs[0]
    assert stops[0] == ["sft_1"]
    assert "resumed from warm-up step 1" in outputs[1]


@pytest.mark.distributed
def test_a_signal_during_a_rollout_abandons_that_step(signalled_twice):
    _, _, outputs, stops = signalled_twice
    assert "stop requested during the rollout of step 3: checkpoint at step 2" in outputs[1]
    assert stops[1] == ["sft_1", "step_2"]
    assert "resumed from step 2" in outputs[2]


@pytest.mark.distributed
def test_a_run_stopped_twice_ends_on_the_uninterrupted_metrics_and_weights(signalled_twice):
    reference, out, _, _ = signalled_twice
    expected, got = metric_values(reference), metric_values(out)
    assert [row["step"] for row in got] == [1, 2, 3, 4, 5, 6]
    for want, have in zip(expected, got):
        for key, value in want.items():
            assert have[key] == (pytest.approx(value, rel=1e-5, abs=1e-7) if isinstance(value, float) else value), (
                want["step"], key)
    expected_weights = load_file(reference / "export" / "model.safetensors")
    got_weights = load_file(out / "export" / "model.safetensors")
    for name, value in expected_weights.items():
        assert rel_err(got_weights[name], value) <= 1e-6, name
