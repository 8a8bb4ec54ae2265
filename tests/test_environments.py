"""Environments of multi-turn rollouts (pg_deepspeed/grpo/environments.py): loading `--environment`, with one-line
refusals naming the option; what an environment may return, checked with the conversation named; the built-in
calculator (its arithmetic, its two tool-call formats, its verifier); the environment's reward among --reward_fn's."""
import math

import pytest

from pg_deepspeed.grpo.environments import (
    CalculatorEnvironment, EnvironmentFault, calculate, checked_reset, checked_step, load_environment, same_number,
    tool_call, with_environment,
)
from pg_deepspeed.grpo.rewards import resolve_rewards


class Echo:
    """A user environment as docs/multiturn.md shows one: echoes the turn's length, done after two steps."""

    def __init__(self):
        self.steps = 0

    def reset(self, example):
        return [{"role": "user", "content": example["prompt"]}]

    def step(self, messages):
        self.steps += 1
        return [{"role": "user", "content": f"{len(messages[-1]['content'])} characters"}], None, self.steps == 2


class NoStep:
    def reset(self, example):
        return []


class NeedsArguments(Echo):
    def __init__(self, level):
        super().__init__()


def a_function():
    return Echo()


def test_a_built_in_name_or_module_colon_class_loads_the_class():
    assert load_environment("calculator") is CalculatorEnvironment
    assert load_environment(f"{__name__}:Echo") is Echo
    assert load_environment("pg_deepspeed.grpo.environments:CalculatorEnvironment") is CalculatorEnvironment


@pytest.mark.parametrize("spec, message", [
    ("calculater", "expected a built-in name (calculator) or 'module:Class'"),
    ("no_such_module_xyz:Env", "cannot import module 'no_such_module_xyz' (ModuleNotFoundError"),
    (f"{__name__}:Missing", f"module '{__name__}' has no 'Missing'"),
    (f"{__name__}:a_function", "'a_function' is a function, not a class"),
    (f"{__name__}:NoStep", "class NoStep has no step method"),
    (f"{__name__}:NeedsArguments", "NeedsArguments() must take no arguments, its constructor requires level"),
])
def test_what_cannot_be_an_environment_is_refused_in_one_line_naming_the_option(spec, message):
    with pytest.raises(ValueError) as error:
        load_environment(spec)
    text = str(error.value)
    assert text.startswith(f"--environment {spec!r}: ") and message in text and "\n" not in text, text


class Returns:
    """Returns whatever it is given, to check what the rollout accepts."""

    def __init__(self, value):
        self.value = value

    def reset(self, example):
        return self.value

    def step(self, messages):
        return self.value


@pytest.mark.parametrize("value, message", [
    ("hello", "Returns.step returned str at conversation 3/1, turn 2, not a tuple (observations, reward, done)"),
    (({"role": "user", "content": "x"}, None, False), "returned observations of type dict"),
    (([{"role": "assistant", "content": "I said"}], None, False), "observation 0 at conversation 3/1, turn 2 is not"),
    (([{"role": "tool", "content": 4}], None, False), "with a role among ('tool', 'user', 'system') and text"),
    (([], math.nan, True), "returned the reward nan at conversation 3/1, turn 2: a finite number or None"),
    (([], True, True), "returned the reward True"),
    (([], 1.0, 1), "returned done=1 at conversation 3/1, turn 2: a bool"),
])
def test_a_step_that_returns_something_else_is_refused_naming_the_conversation(value, message):
    with pytest.raises(EnvironmentFault, match=None) as error:
        checked_step(Returns(value), [{"role": "user", "content": "q"}], "conversation 3/1, turn 2")
    assert message in str(error.value), str(error.value)


def test_a_step_gets_a_copy_and_its_answer_is_checked_as_returned():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "abc"}]
    env = Echo()
    assert checked_step(env, messages, "c") == ([{"role": "user", "content": "3 characters"}], None, False)
    assert checked_step(env, messages, "c")[2] is True
    assert checked_step(Returns(([], 1, True)), messages, "c") == ([], 1.0, True)


def test_a_reset_that_is_no_prompt_is_refused():
    with pytest.raises(EnvironmentFault, match="Returns.reset returned a conversation that cannot be a prompt for "
                                               "conversation 0, reset: the conversation has no user message"):
        checked_reset(Returns([{"role": "system", "content": "s"}]), {}, "conversation 0, reset")
    with pytest.raises(EnvironmentFault, match="reset returned a str, not a list of messages"):
        checked_reset(Returns("hello"), {}, "conversation 0, reset")


@pytest.mark.parametrize("expression, value", [
    ("2+3*4", "14"), ("(12 + 30) * 4", "168"), ("10/4", "2.5"), ("7 // 2", "3"), ("-3 ** 2", "-9"), ("2**10", "1024"),
    ("6 × 7", "42"), ("1/3", "0.3333333333"), ("1/0", "error: division by zero"),
    ("__import__('os').system('x')", "error: not arithmetic"), ("2 ** 1000", "error: power too large"),
    ("two plus two", "error: not an arithmetic expression"), ("x + 1", "error: not arithmetic"), ("", "error: expected an arithmetic expression"),
    ("1 +", "error: not an arithmetic expression"),
])
def test_the_calculator_evaluates_arithmetic_and_nothing_else(expression, value):
    assert calculate(expression).startswith(value), calculate(expression)


def test_tool_calls_are_read_in_the_plain_and_the_json_format():
    assert tool_call("Let me compute. <calculator>12*7</calculator>") == "12*7"
    assert tool_call('<tool_call>\n{"name": "calculator", "arguments": {"expression": "3+4"}}\n</tool_call>') == "3+4"
    assert tool_call('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"9\\"}"}</tool_call>') == "9"
    assert tool_call("<tool_call>{not json}</tool_call>") == ""  # answered with an error, not ignored
    assert tool_call("The answer is 5.") is None


def test_the_calculator_environment_answers_calls_and_scores_the_final_answer():
    env = CalculatorEnvironment()
    first = env.reset({"prompt": "What is 12*7+3?", "answer": "87"})
    assert first[0]["role"] == "user" and first[0]["content"].startswith("What is 12*7+3?\n\n")
    assert "<calculator>" in first[0]["content"] and "<answer>" in first[0]["content"]
    turn = [*first, {"role": "assistant", "content": "<calculator>12*7+3</calculator>"}]
    assert env.step(turn) == ([{"role": "tool", "content": "87"}], None, False)
    assert env.step([*turn, {"role": "tool", "content": "87"},
                     {"role": "assistant", "content": "So 86, no: <answer>87</answer>"}]) == ([], 1.0, True)
    assert env.step([*first, {"role": "assistant", "content": "<answer>86</answer>"}]) == ([], 0.0, True)
    assert env.step([*first, {"role": "assistant", "content": "It is 87."}]) == ([], 1.0, True)  # no tag: last number
    assert env.tool_calls == 1
    with pytest.raises(ValueError, match="questions given as text"):
        env.reset({"prompt": [{"role": "user", "content": "hi"}], "answer": "1"})


def test_same_number_reads_the_last_number_of_the_text():
    assert same_number("12 + 30 = 42", "42") and same_number("1,000", "1000") and same_number("0.5", "0.50")
    assert not same_number("42 or 41", "42") and not same_number("none", "4")


def test_the_environment_reward_is_one_more_weighted_function():
    alone = with_environment(None)
    assert alone.names == ("environment",) and alone.weights == (1.0,)
    assert alone.score(["p"] * 2, ["a", "b"], ["x"] * 2, {"environment": [0.25, 1.0]}) == ([0.25, 1.0],
                                                                                            [[0.25, 1.0]])
    both = with_environment(resolve_rewards(["format"], None, synthetic=False, format_reward=0.0), weight=2.0)
    total, parts = both.score(["p"] * 2, ["<answer>1</answer>", "1"], ["1"] * 2, {"environment": [0.5, 1.0]})
    assert both.names == ("environment", "format") and parts == [[0.5, 1.0], [1.0, 0.0]] and total == [2.0, 2.0]
    with pytest.raises(ValueError, match="--reward_fn names a function 'environment'"):
        with_environment(alone)
