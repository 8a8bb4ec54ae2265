"""`--task reasoning_gym:<name>`: examples drawn from the reasoning-gym package by global index (the same index, the
same entry, in any process and any order: what a resumed run needs), scored by the task's own scorer; its options
from `--task_config`; no curriculum. The real package throughout (reasoning-gym 0.1.25 measured)."""
import json
import os
import subprocess
import sys
import warnings

import pytest

from conftest import REPO
from pg_deepspeed.demo.char_tokenizer import build_char_tokenizer
from pg_deepspeed.grpo.args import DataArguments, GRPOArguments, ModelArguments, TrainArguments
from pg_deepspeed.grpo.data import SFT_OFFSET, Curriculum, build_source
from pg_deepspeed.grpo.gym_tasks import ReasoningGymTask
from pg_deepspeed.grpo.evaluation import EVAL_OFFSET, held_out
from pg_deepspeed.grpo.rewards import reasoning_gym_answer, resolve_rewards, row_columns
from pg_deepspeed.grpo.setup_checks import curriculum_of, prepare

ARITHMETIC = "reasoning_gym:basic_arithmetic"
HAYSTACK = "reasoning_gym:needle_haystack"
# the first index, both sides of a block boundary, a far training index, the held-out and warm-up ranges, the last
INDICES = [0, 1, 999, 1000, 1001, 123_456_789, EVAL_OFFSET, EVAL_OFFSET + 3, SFT_OFFSET, SFT_OFFSET + 7, 2**62 - 1]


def source(task: str = ARITHMETIC, seed: int = 0, config: str | None = None) -> ReasoningGymTask:
    return build_source(task, None, prompt_length=256, seed=seed, task_config=config)


def as_json(task: ReasoningGymTask, indices) -> list:
    return [[e.prompt, e.answer, e.columns] for e in map(task.example, indices)]


# ---------------------------------------------------------------- index -> entry
@pytest.mark.parametrize("task", [ARITHMETIC, HAYSTACK])
def test_an_example_is_a_function_of_the_seed_and_its_index_alone_whatever_the_order_it_is_read_in(task):
    first, second = source(task, seed=3), source(task, seed=3)
    forward = [first.example(i) for i in INDICES]
    backward = [second.example(i) for i in reversed(INDICES)][::-1]
    assert forward == backward
    assert [e.columns for e in forward] == [e.columns for e in backward]  # the entries too (not hashed)
    assert [first.example(i) for i in INDICES] == forward  # read again, after other blocks were built
    assert [source(task, seed=4).example(i) for i in INDICES] != forward  # another seed, other examples


@pytest.mark.parametrize("task", [ARITHMETIC, HAYSTACK])
def test_two_fresh_processes_read_the_same_entries_as_this_one(task):
    """Each rank, and a resumed run, is a new process with its own hash seed: the entries must not depend on it."""
    script = ("import json, sys; from pg_deepspeed.grpo.data import build_source; "
              "t = build_source(sys.argv[1], None, 256, 5); "
              "print(json.dumps([[e.prompt, e.answer, e.columns] for e in map(t.example, json.loads(sys.argv[2]))]))")
    runs = [subprocess.run([sys.executable, "-c", script, task, json.dumps(INDICES)], cwd=REPO, capture_output=True,
                           text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": seed})
            for seed in ("1", "2")]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    here = json.loads(json.dumps(as_json(source(task, seed=5), INDICES)))
    assert json.loads(runs[0].stdout) == json.loads(runs[1].stdout) == here


def test_distinct_indices_give_varied_examples_across_blocks_and_ranges():
    task = source(ARITHMETIC)
    for start in (0, 995, EVAL_OFFSET, SFT_OFFSET):  # 995: the block boundary at 1000 inside the range
        prompts = [task.example(i).prompt for i in range(start, start + 50)]
        assert len(set(prompts)) >= 45, prompts
    training = {task.example(i).prompt for i in range(200)}
    held_out_prompts = {task.example(EVAL_OFFSET + i).prompt for i in range(200)}
    assert len(training & held_out_prompts) <= 10  # other seeds: at most chance repeats of short expressions


def test_the_example_is_the_entry_s_question_and_answer_and_the_entry_is_kept_as_json():
    task = source(ARITHMETIC)
    example = task.example(17)
    entry = example.columns["entry"]
    assert set(example.columns) == {"entry"} and task.extra_columns == ("entry",)
    assert example.prompt == entry["question"] and example.answer == entry["answer"]
    assert entry["metadata"]["source_dataset"] == "basic_arithmetic"
    assert json.loads(json.dumps(example.columns)) == json.loads(json.dumps(task.example(17).columns))
    entry["answer"] = "tampered"  # what a reward function does to its copy changes nothing
    assert task.example(17).columns["entry"]["answer"] == example.answer


def test_a_generator_that_scores_without_a_reference_answer_gives_an_empty_answer():
    example = source("reasoning_gym:graph_color").example(0)
    assert example.answer == "" and example.columns["entry"]["answer"] is None


# ---------------------------------------------------------------- needle_haystack, the long-context one
def test_needle_haystack_prompts_are_long_and_its_options_make_them_longer():
    tokenizer = build_char_tokenizer()  # one token per character: the tiny presets' tokenizer
    default = [len(tokenizer(source(HAYSTACK).example(i).prompt)["input_ids"]) for i in range(200)]
    assert 1200 < sum(default) / len(default) < 2400 and max(default) < 4096  # 10-100 statements; the presets' 4096
    long = source(HAYSTACK, config='{"min_num_statements": 400, "max_num_statements": 500}')
    lengths = [len(tokenizer(long.example(i).prompt)["input_ids"]) for i in range(20)]
    assert min(lengths) > 12_000
    example = long.example(0)
    assert example.answer in example.prompt and example.prompt.endswith("Reply only with a name.")


# ---------------------------------------------------------------- the reward
def reward_of(task: ReasoningGymTask, index: int, completions: list[str], reward_fn=None, weights=None):
    rewards = resolve_rewards(reward_fn, weights, synthetic=True, format_reward=0.2, task_scorer=task.score_answer,
                              task=task.name)
    example = task.example(index)
    n = len(completions)
    return rewards, rewards.score([example.prompt] * n, completions, [example.answer] * n,
                                  row_columns([example.columns], n))


@pytest.mark.parametrize("task", [ARITHMETIC, HAYSTACK])
def test_the_task_s_scorer_gives_full_marks_to_its_own_answer_in_an_answer_tag_and_less_to_a_wrong_one(task):
    task = source(task)
    answer = task.example(2).answer
    completions = [f"<think>so</think>\n<answer> {answer} </answer>",  # reasoning-gym's format
                   f"<answer>0</answer> no, <answer>{answer}</answer>",  # the last tag counts
                   f"  {answer}\n",  # no tag: the whole completion, stripped
                   f"<answer>{answer}{answer}9</answer>", "<answer></answer>", ""]
    rewards, (total, parts) = reward_of(task, 2, completions)
    assert rewards.names == ("reasoning_gym",)
    assert total[:3] == [1.0, 1.0, 1.0]
    assert all(0.0 <= r < 1.0 for r in total[3:]) and total[4:] == [0.0, 0.0]


def test_the_reward_composes_with_others_by_name_and_weight():
    task = source(ARITHMETIC)
    answer = task.example(0).answer
    rewards, (total, parts) = reward_of(task, 0, [f"<answer>{answer}</answer>", answer],
                                        reward_fn=["reasoning_gym", "format"], weights=[1.0, 0.25])
    assert rewards.names == ("reasoning_gym", "format")
    assert parts == [[1.0, 1.0], [1.0, 0.0]] and total == [1.25, 1.0]


def test_an_answer_the_scorer_raises_on_scores_zero_with_one_warning():
    task = source("reasoning_gym:prime_factorization")  # its scorer parses factors with int()
    with pytest.warns(UserWarning, match="reasoning_gym: the scorer of reasoning_gym:prime_factorization raised"):
        _, (total, _) = reward_of(task, 0, ["<answer>abc</answer>", "<answer>x y</answer>"])
    assert total == [0.0, 0.0]
    assert reasoning_gym_answer("a <answer>\n 7 \n</answer>") == "7"


def test_the_reasoning_gym_reward_is_refused_without_a_reasoning_gym_task():
    with pytest.raises(ValueError, match=r"--reward_fn reasoning_gym scores with a reasoning-gym task's own scorer: "
                                         r"it needs --task reasoning_gym:<name>, not --task needle"):
        resolve_rewards(["reasoning_gym"], None, synthetic=True, format_reward=0.2, task="needle")


# ---------------------------------------------------------------- set-up refusals: one line naming the culprit
@pytest.mark.parametrize("config, message", [
    ("{min_terms: 2}", r"--task_config '\{min_terms: 2\}' is not JSON \(Expecting property name"),
    ("[2, 4]", r"--task_config '\[2, 4\]' must be a JSON object of the generator's options"),
    ('{"min_term": 2}', r"--task_config option 'min_term': reasoning_gym:basic_arithmetic has no such option "
                        r"\(its options: min_terms, max_terms, "),
    ('{"seed": 1}', r"--task_config option 'seed': the run sets it"),
    ('{"size": 10}', r"--task_config option 'size': the run sets it"),
    ('{"operators": ["%"]}', r"--task_config option 'operators' \(\[\"%\"\]\): reasoning_gym:basic_arithmetic "
                             r"refuses it \(unsupported operator: %\)"),
    ('{"min_terms": "two"}', r"--task_config option 'min_terms' \(\"two\"\): reasoning_gym:basic_arithmetic "
                             r"refuses it"),
    ('{"min_terms": 5, "max_terms": 3}', r"--task_config \{\"min_terms\": 5, \"max_terms\": 3\}: "
                                         r"reasoning_gym:basic_arithmetic refuses it \(max_terms must be >= min_terms\)"),
])
def test_a_bad_task_config_is_refused_naming_it(config, message):
    with pytest.raises(ValueError, match=message) as error:
        source(ARITHMETIC, config=config)
    assert "\n" not in str(error.value)


def test_an_unknown_reasoning_gym_task_is_refused_listing_valid_names():
    with pytest.raises(ValueError, match=r"--task reasoning_gym:needle_hay: reasoning-gym has no task 'needle_hay'; "
                                         r"did you mean needle_haystack\? its \d+ tasks include basic_arithmetic, "):
        source("reasoning_gym:needle_hay")
    with pytest.raises(ValueError, match=r"unknown --task 'gsm8k'; built-in tasks: .*, or reasoning_gym:<name>"):
        source("gsm8k")


def test_a_task_config_without_a_reasoning_gym_task_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--task_config holds the options of a --task reasoning_gym:<name> generator; "
                                         "--task needle takes none"):
        build_source("needle", None, 256, 0, task_config='{"min_terms": 2}')
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    with pytest.raises(ValueError, match="a --dataset takes none"):
        build_source(ARITHMETIC, str(data), 256, 0, task_config='{"min_terms": 2}')


# ---------------------------------------------------------------- no curriculum
def test_a_reasoning_gym_task_has_no_curriculum_by_default_and_asking_for_one_is_refused_by_name():
    assert curriculum_of(DataArguments(task=ARITHMETIC), max_steps=100) is None
    assert curriculum_of(DataArguments(task=ARITHMETIC, curriculum_start_length=0), max_steps=100) is None
    with pytest.raises(ValueError, match=r"--curriculum_start_length 16: the curriculum grows the built-in synthetic "
                                         r"tasks' prompts; --task reasoning_gym:basic_arithmetic's are its generator's"):
        curriculum_of(DataArguments(task=ARITHMETIC, curriculum_start_length=16), max_steps=100)
    with pytest.raises(ValueError, match="--curriculum_start_length grows the built-in synthetic tasks' prompts"):
        build_source(ARITHMETIC, None, 256, 0, curriculum=Curriculum(16, 256, 10))


# ---------------------------------------------------------------- through prepare()
def plan(monkeypatch, reward_fn=None, weights=None, **data):
    monkeypatch.setenv("WORLD_SIZE", "1")
    return prepare(ModelArguments(), DataArguments(**data), GRPOArguments(reward_fn=reward_fn, reward_weights=weights),
                   TrainArguments(ds_config="ds_configs/zero3_cpu.json"))


def test_prepare_reads_the_task_scores_it_with_its_own_scorer_and_holds_out_examples_no_step_reads(monkeypatch):
    setup = plan(monkeypatch, task=HAYSTACK, task_config='{"max_num_statements": 20}', eval_examples=3)
    assert isinstance(setup.source, ReasoningGymTask) and setup.source.config == {"max_num_statements": 20}
    assert setup.rewards.names == ("reasoning_gym",)
    assert setup.train.sft_warmup_steps == 0  # no curriculum, so no supervised start
    assert setup.eval_set.examples == [setup.source.example(EVAL_OFFSET + i) for i in range(3)]
    assert setup.eval_set.name == "3 held-out examples of reasoning_gym:needle_haystack"
    composed = plan(monkeypatch, reward_fn=["reasoning_gym", "format"], weights=[1.0, 0.2], task=ARITHMETIC)
    assert composed.rewards.names == ("reasoning_gym", "format") and composed.rewards.weights == (1.0, 0.2)


def test_prepare_refuses_a_warm_up_on_a_task_without_reference_answers(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match=r"--sft_warmup_steps 2: --task reasoning_gym:graph_color has no reference "
                                         r"answers to imitate"):
        prepare(ModelArguments(), DataArguments(task="reasoning_gym:graph_color"), GRPOArguments(),
                TrainArguments(ds_config="ds_configs/zero3_cpu.json", sft_warmup_steps=2))


def test_a_generator_whose_entries_follow_the_hash_seed_warns_unless_it_is_fixed(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    with pytest.warns(UserWarning, match="depend on Python's hash seed.*PYTHONHASHSEED"):
        source("reasoning_gym:ransom_note")
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        source("reasoning_gym:ransom_note")
