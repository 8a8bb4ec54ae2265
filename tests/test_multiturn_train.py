"""Multi-turn GRPO through the real launcher: two ranks, ZeRO-3, conversations sampled as trees (--branching 2,2,2),
three steps on the built-in calculator environment and on a user environment.

The model: a tiny random Qwen2 over the character vocabulary with a ChatML-like template, whose embedding carries a
constant feature that its LM head reads as a pull towards end-of-turn, so that turns end by themselves (about 1 token
in 6), as a chat model's do."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REPO, run_deepspeed
from pg_deepspeed.demo.char_tokenizer import build_char_tokenizer
from pg_deepspeed.demo.presets import preset_config

# no whitespace beside the role markers and EOS: the character tokenizer drops it there, which the template rule
# (chat_turns.py) rightly refuses as a template break
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "dist"), os.environ.get("PYTHONPATH", "")])}


def save_turn_taking_model(model_dir) -> None:
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config("tiny-qwen2"))
    with torch.no_grad():  # a constant feature in dimension 0, read by the LM head's end-of-turn row only
        model.model.embed_tokens.weight[:, 0] = 4.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 0.3
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("turn_taking")
    save_turn_taking_model(path)
    return path


def train(model_dir, out, *extra: str) -> list[dict]:
    result = run_deepspeed(
        "launch/train.py", "--ds_config", "ds_configs/zero3_cpu.json", "--model", str(model_dir),
        "--branching", "2,2,2", "--num_generations", "8", "--max_turns", "3", "--max_new_tokens", "24",
        "--max_completion_tokens", "200", "--prompts_per_device", "2", "--max_steps", "3", "--learning_rate", "1e-3",
        "--log_completions_steps", "1", "--no_export", "--output_dir", str(out), *extra, env=ENV)
    assert result.returncode == 0, result.stdout[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_three_steps_on_a_user_environment_train_the_tree_and_log_turns_and_shared_tokens(model_dir, tmp_path):
    rows = train(model_dir, tmp_path / "run", "--environment", "multiturn_envs:KeepsAsking", "--task", "needle",
                 "--prompt_length", "32", "--curriculum_start_length", "0")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert 1.0 < r["turns_mean"] <= 3.0 and r["tool_calls_mean"] == 0.0
        # more than the prompts' repeats (7 per group): the shared turns of each tree
        assert r["prefix_tokens_saved"] > 2 * 2 * 7 * r["prompt_length"]
        assert all(map(lambda k: r[k] == r[k], ("loss", "reward_mean", "kl")))  # finite: not NaN
    samples = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 2 * 2 * 8  # steps x ranks x prompts x G
    assert all(s["prompt"].startswith("<|user|>") and s["prompt"].endswith("<|assistant|>") for s in samples)
    three = [s for s in samples if s["turns"] == 3]
    assert three and all(s["completion"].count("<|user|>Again?<eos><|assistant|>") == 2 for s in three)


@pytest.mark.distributed
def test_three_steps_on_the_built_in_calculator_environment(model_dir, tmp_path):
    rows = train(model_dir, tmp_path / "run", "--environment", "calculator", "--task", "reasoning_gym:basic_arithmetic",
                 "--advantage_level", "node", "--eval_examples", "6", "--eval_steps", "2")
    evaluations = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evaluations] == [0, 2, 3]  # before the first step, every 2, at the end
    for r in evaluations:  # one conversation per held-out example, greedy and sampled, scored by the environment
        assert 0.0 <= r["eval/accuracy"] <= 1.0 and "eval/reward/environment" in r and "eval/reward_mean" in r
    rows = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert 1.0 <= r["turns_mean"] <= 3.0 and r["tool_calls_mean"] >= 0.0 and r["prefix_tokens_saved"] > 0
        assert r["loss"] == r["loss"] and "reward/environment" in r


class LongPreamble:
    """A user environment whose prompt is its own preamble, longer than the dataset's prompt."""

    def reset(self, example: dict) -> list[dict]:
        return [{"role": "user", "content": "x" * 300 + example["prompt"][-1]["content"]}]

    def step(self, messages: list[dict]) -> tuple[list[dict], float | None, bool]:
        return [], 0.0, True


def plan(model_dir, tmp_path, environment: str, **grpo):
    from pg_deepspeed.grpo.args import DataArguments, GRPOArguments, ModelArguments, TrainArguments
    from pg_deepspeed.grpo.setup_checks import prepare

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes?"},
                                           {"role": "user", "content": "2+3"}], "answer": "5"}) + "\n")
    return prepare(ModelArguments(model=str(model_dir)), DataArguments(dataset=str(data)),
                   GRPOArguments(environment=environment, max_completion_tokens=64, max_new_tokens=8, **grpo),
                   TrainArguments(ds_config="ds_configs/zero3_cpu.json"))


def test_an_environment_that_cannot_reset_the_data_is_refused_at_set_up_in_one_line(model_dir, tmp_path, monkeypatch):
    """The calculator asks questions given as text; a conversational --dataset used to pass the set-up and fail at
    the first rollout's reset, after the engines were built."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError) as error:
        plan(model_dir, tmp_path, "calculator")
    text = str(error.value)
    assert text.startswith("--environment 'calculator': CalculatorEnvironment.reset raised ValueError (the "
                           "calculator environment asks questions given as text, not as a conversation)"), text
    assert "\n" not in text


def test_the_longest_sequence_counts_the_prompt_the_environment_writes(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    setup = plan(model_dir, tmp_path, f"{__name__}:LongPreamble")
    assert setup.max_length >= 300 + 64  # the environment's prompt, not the dataset's few characters, + the budget
