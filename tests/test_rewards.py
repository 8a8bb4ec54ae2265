"""Composed rewards: the math_accuracy and format built-ins, weights, per-function scores, dataset columns passed by
keyword to the functions that ask for them, and the set-up refusals. The math_accuracy table is what math-verify
(0.9.0) does, measured: docs/trainer.md quotes it."""
import json
import math
import re

import pytest

from pg_deepspeed.grpo.data import FileDataset
from pg_deepspeed.grpo.rewards import (DEFAULT_FORMAT_PATTERN, RewardError, RewardFunctions, check_reward_options,
                                       compute_rewards, exact_match, make_format, make_math_accuracy,
                                       resolve_rewards, row_columns)


def math_accuracy(completion: str, answer: str, pattern: str = DEFAULT_FORMAT_PATTERN) -> float:
    return make_math_accuracy(pattern)(["p"], [completion], [answer])[0]


# (dataset answer, completion, reward): equal values in any notation score 1.0, anything else 0
MATH_TABLE = [
    # fractions, decimals and LaTeX, either side
    ("1/2", "0.5", 1.0),
    ("0.5", "1/2", 1.0),
    ("0.5", r"\frac{1}{2}", 1.0),
    (r"\frac{1}{2}", "0.5", 1.0),
    (r"\frac{1}{2}", r"$\frac12$", 1.0),
    ("1/3", "0.333333", 1.0),  # equal to 6 decimal places
    ("1/3", "0.33", 0.0),
    ("2", "2.0", 1.0),
    ("2", "2.0000001", 0.0),  # an integer answer wants the integer: a near miss in the 7th place is wrong
    ("0.1", "0.1000001", 1.0),  # ... while a decimal one is rounded to 6 places
    ("1000", "1,000", 1.0),
    # \boxed{} on either side, and the other LaTeX delimiters
    ("0.5", r"The answer is \boxed{\frac{1}{2}}.", 1.0),
    (r"\boxed{\frac{1}{2}}", "1/2", 1.0),
    ("5", r"\(5\)", 1.0),
    ("5", r"\[5\]", 1.0),
    # negative numbers
    ("-3", "-3", 1.0),
    ("-3", "3", 0.0),
    ("3", "-3", 0.0),
    (r"-\frac{1}{2}", "-0.5", 1.0),
    (r"-\frac{1}{2}", "0.5", 0.0),
    # units are dropped, on either side, in text or \text{}
    ("5", "5 cm", 1.0),
    ("5 cm", "5", 1.0),
    ("5", r"\boxed{5\text{ cm}}", 1.0),
    ("5", "5 meters", 1.0),
    # percentages: a gold 50\% accepts 0.5 and 50; a gold 0.5 does not accept a bare "50\%" (read as 50)
    (r"50\%", "0.5", 1.0),
    (r"50\%", "50", 1.0),
    ("0.5", r"50\%", 0.0),
    # symbols and constants (a bare "1+x" in a completion is read as its last number; inside $...$ as the sum)
    (r"\sqrt{2}", "1.41421356", 1.0),
    (r"\sqrt{2}", "1.414", 0.0),
    (r"\pi", "3.14159265", 1.0),
    ("x+1", "$1+x$", 1.0),
    ("x+1", "1+x", 0.0),
    ("x = 5", "5", 1.0),
    # which number of a longer completion: after "answer is", else the last one
    ("7", "The answer is 7, not 8", 1.0),
    ("7", "The answer is 8, not 7", 0.0),
    ("7", "8 or 7", 1.0),
    ("7", "7 or 8", 0.0),
    ("2", "The answer is $2$ apples", 1.0),
    # wrong, or nothing to read
    ("7", "8", 0.0),
    ("7", "", 0.0),
    ("7", "no number here", 0.0),
    ("5", r"\$5", 0.0),  # a prediction in escaped dollars is not read
    ("Paris", "Paris", 0.0),  # words are not mathematics: use exact_match for them
]


@pytest.mark.parametrize("answer, completion, expected", MATH_TABLE)
def test_math_accuracy_scores_equal_values_in_any_notation(answer, completion, expected):
    assert math_accuracy(completion, answer) == expected


def test_math_verify_is_not_symmetric_so_the_dataset_answer_goes_first():
    """An interval answer does not accept an inequality, but an inequality answer accepts the interval: math-verify
    compares a set with a relation only when the prediction is the set."""
    assert math_accuracy("$1<x<2$", "(1,2)") == 0.0
    assert math_accuracy("$(1,2)$", "1<x<2") == 1.0


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<answer>7</answer>", 1.0),
        ("I think 7. <answer>8</answer>", 0.0),  # the tag's content is scored, not the 7 before it
        ("<answer>8</answer> on second thought <answer>7</answer>", 1.0),  # the last tag
        ("<answer>\n\\boxed{7}\n</answer>", 1.0),  # a tag spanning lines
        ("no tag: 7", 1.0),  # no tag: the whole completion
    ],
)
def test_math_accuracy_scores_the_answer_tag_when_there_is_one(completion, expected):
    assert math_accuracy(completion, "7") == expected


def test_math_accuracy_reads_the_first_group_of_a_custom_pattern():
    assert math_accuracy("work: 3+4=8 ... FINAL: 7", "7", pattern=r"FINAL: (\S+)") == 1.0
    assert math_accuracy("FINAL: 8 and then 7", "7", pattern=r"FINAL: (\S+)") == 0.0


def test_math_accuracy_scores_0_with_a_warning_for_an_answer_math_verify_cannot_read():
    with pytest.warns(UserWarning, match="math_accuracy: math-verify cannot parse the answer ''"):
        assert make_math_accuracy()(["p", "p"], ["", "0"], ["", ""]) == [0.0, 0.0]


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<answer>7</answer>", 1.0),
        ("Let me think.\n<answer>\n7\n</answer>", 1.0),  # anywhere, across lines
        ("<answer></answer>", 1.0),  # the default pattern asks for the tags, not for content
        ("7", 0.0),
        ("<answer>7", 0.0),
        ("<Answer>7</Answer>", 0.0),
    ],
)
def test_format_is_1_where_the_answer_pattern_is_found(completion, expected):
    assert make_format()(["p"], [completion], ["7"]) == [expected]


def test_format_pattern_is_configurable_and_can_require_the_whole_completion():
    whole = make_format(r"^<think>.*</think>\s*<answer>.+</answer>$")
    assert whole(["p"] * 3, ["<think>a\nb</think>\n<answer>7</answer>", "<answer>7</answer>",
                             "<think>a</think><answer>7</answer> trailing"], ["7"] * 3) == [1.0, 0.0, 0.0]
    assert make_format(r"\\boxed\{").__name__ == "format"


def test_a_format_pattern_that_is_no_regex_is_refused_by_name():
    with pytest.raises(ValueError, match=r"--format_pattern '<answer>\(' is not a regular expression"):
        check_reward_options(None, None, "<answer>(")


# ---------------------------------------------------------------- weights and per-function scores
def half(prompts, completions, answers):
    return [0.5] * len(completions)


def length(prompts, completions, answers):
    return [float(len(c)) for c in completions]


def test_the_reward_is_the_weighted_sum_and_each_function_keeps_its_own_scores():
    rewards = resolve_rewards(["numeric_match", "test_rewards:length"], [0.7, -0.25], synthetic=False,
                              format_reward=0.2)
    assert rewards.names == ("numeric_match", "length") and rewards.weights == (0.7, -0.25)
    total, parts = rewards.score(["p"] * 3, ["3", "x=4.0", "none"], ["3", "4", "1"])
    assert parts == [[1.0, 1.0, 0.0], [1.0, 5.0, 4.0]]
    assert total == pytest.approx([0.7 - 0.25, 0.7 - 1.25, -1.0], abs=1e-12)


def test_weights_default_to_one_each_and_may_be_one_space_separated_string():
    rewards = resolve_rewards("exact_match   test_rewards:half", None, synthetic=False, format_reward=0.2)
    assert rewards.names == ("exact_match", "half") and rewards.weights == (1.0, 1.0)
    assert rewards.score(["p"] * 2, ["a", "b"], ["a", "a"])[0] == [1.5, 0.5]
    assert resolve_rewards(["format math_accuracy"], "2 0.5", synthetic=False, format_reward=0.2).weights == (2.0, 0.5)


def test_unset_reward_fn_is_the_tasks_default_and_takes_one_weight():
    assert resolve_rewards(None, None, synthetic=True, format_reward=0.2).names == ("digit_answer",)
    default = resolve_rewards(None, [3.0], synthetic=False, format_reward=0.2)
    assert default.functions == (exact_match,) and default.score(["p"], ["a"], ["a"])[0] == [3.0]


@pytest.mark.parametrize(
    "specs, weights, message",
    [
        (["numeric_match", "format"], [0.7], "--reward_weights has 1 weight but --reward_fn names 2 functions"),
        (["numeric_match"], [0.7, 0.3], "--reward_weights has 2 weights but --reward_fn names 1 function:"),
        (None, [1.0, 1.0], "--reward_weights has 2 weights but --reward_fn is unset (the task's one default function)"),
        (["numeric_match", "format"], [1.0, float("nan")], "--reward_weights must be finite numbers, got nan"),
    ],
)
def test_weights_not_one_finite_number_per_function_are_refused_naming_both_options(specs, weights, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_reward_options(specs, weights, DEFAULT_FORMAT_PATTERN)
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_rewards(specs, weights, synthetic=False, format_reward=0.2)


def test_two_functions_of_one_name_are_refused_since_their_metrics_would_collide():
    with pytest.raises(ValueError, match=r"names two functions 'numeric_match': their metrics reward/numeric_match"):
        resolve_rewards(["numeric_match", "numeric_match"], None, synthetic=False, format_reward=0.2)


def nan_reward(prompts, completions, answers):
    return [float("nan")] * len(completions)


def test_a_misbehaving_function_among_several_stops_the_run_naming_it():
    rewards = resolve_rewards(["exact_match", "test_rewards:nan_reward"], [1.0, 1.0], synthetic=False,
                              format_reward=0.2)
    with pytest.raises(RewardError, match=r"reward function nan_reward returned NaN/inf for completion\(s\) \[0\]"):
        rewards.score(["p"], ["a"], ["a"])


def test_accuracy_counts_completions_whose_every_positively_weighted_function_returned_1():
    def named(name):
        fn = lambda p, c, a: [0.0] * len(c)  # noqa: E731
        fn.__name__ = name
        return fn

    rewards = RewardFunctions((named("a"), named("b"), named("c")), (0.7, 0.3, -1.0), ("a", "b", "c"))
    parts = [[1.0, 1.0, 0.5, 1.0], [1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]]  # c's weight <= 0: not counted
    assert rewards.accuracy(parts) == 0.5
    only = RewardFunctions((named("a"),), (1.0,), ("a",))
    assert only.accuracy([[1.0, 0.2, 0.0, 1.0]]) == 0.5  # one function of weight 1: reward == 1.0, as before
    assert RewardFunctions((named("a"),), (-1.0,), ("a",)).accuracy([[1.0]]) == 0.0


# ---------------------------------------------------------------- dataset columns by keyword
def wants_difficulty(prompts, completions, answers, difficulty):
    return [float(d) for d in difficulty]


def wants_source_by_keyword_only(prompts, completions, answers, *, source, unused_default=None):
    assert unused_default is None
    return [float(s == "gsm8k") for s in source]


seen_kwargs = []


def takes_every_column(prompts, completions, answers, **kwargs):
    seen_kwargs.append(kwargs)
    return [0.0] * len(completions)


def three_lists_only(prompts, completions, answers):
    return [1.0] * len(completions)


COLUMNS = {"difficulty": [1, 1, 3, 3], "source": ["gsm8k", "gsm8k", "math", "math"], "answers": ["x"] * 4}


def test_columns_reach_a_function_that_names_them_and_not_one_that_does_not():
    args = (["p", "p", "q", "q"], ["a", "b", "c", "d"], ["1", "1", "2", "2"], COLUMNS)
    assert compute_rewards(wants_difficulty, *args) == [1.0, 1.0, 3.0, 3.0]
    assert compute_rewards(wants_source_by_keyword_only, *args) == [1.0, 1.0, 0.0, 0.0]
    assert compute_rewards(three_lists_only, *args) == [1.0] * 4  # would raise TypeError if given a keyword
    seen_kwargs.clear()
    compute_rewards(takes_every_column, *args)
    # every column, except one whose name is already a positional parameter's
    assert seen_kwargs == [{"difficulty": [1, 1, 3, 3], "source": ["gsm8k", "gsm8k", "math", "math"]}]


def test_a_function_asking_for_a_column_the_data_lacks_is_refused_at_set_up():
    rewards = resolve_rewards(["numeric_match", "test_rewards:wants_source_by_keyword_only"], None, synthetic=False,
                              format_reward=0.2)
    rewards.check_columns(["difficulty", "source"], where="train.jsonl")
    with pytest.raises(ValueError, match=r"--reward_fn wants_source_by_keyword_only asks for the column\(s\) source "
                                         r"that train.jsonl does not have \(its other columns: difficulty\)"):
        rewards.check_columns(["difficulty"], where="train.jsonl")


def two_lists(completions, solution):
    return [0.0] * len(completions)


def test_a_function_that_cannot_take_the_three_lists_is_refused_at_set_up():
    with pytest.raises(ValueError, match=r"--reward_fn test_rewards:two_lists: two_lists takes 2 positional arguments"):
        resolve_rewards(["test_rewards:two_lists"], None, synthetic=False, format_reward=0.2)


def test_the_rollout_repeats_each_examples_columns_for_its_completions():
    assert row_columns([{"d": 1, "s": "a"}, {"d": 2, "s": "b"}], 3) == {"d": [1, 1, 1, 2, 2, 2],
                                                                       "s": ["a", "a", "a", "b", "b", "b"]}
    assert row_columns([{}, {}], 2) == {}


def test_a_file_dataset_keeps_each_rows_other_columns_and_stays_a_function_of_the_index(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": i, "difficulty": i % 3, "meta": {"id": i}}) + "\n"
                            for i in range(7)))
    ds = FileDataset(str(path), seed=3)
    assert ds.extra_columns == ("difficulty", "meta")
    forward = [ds.example(i) for i in range(20)]
    for e in forward:
        i = int(e.prompt[1:])
        assert e.columns == {"difficulty": i % 3, "meta": {"id": i}}
    forward[0].columns["meta"]["id"] = -1  # a reward function that changes a value changes no later example
    again = FileDataset(str(path), seed=3)
    assert [again.example(i) for i in reversed(range(20))][::-1] == [ds.example(i) for i in range(20)]
    assert math.isclose(ds.example(0).columns["meta"]["id"], int(ds.example(0).prompt[1:]))
