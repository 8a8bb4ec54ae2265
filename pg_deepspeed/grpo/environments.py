"""Environments of multi-turn rollouts (`--environment`): what answers the model between its turns, and its reward.

An environment is a class constructed with no arguments; each conversation has its own instance:

- `reset(example: dict) -> list[dict]`: the conversation's first messages (`{"role", "content"}`, at least one user
  message, not ending with an assistant message) for a dataset row (`example`: `prompt`, `answer` and the row's
  other columns);
- `step(messages: list[dict]) -> (observations: list[dict], reward: float | None, done: bool)`: `messages` is the
  conversation so far, the model's last turn included (its `content` the text the model wrote, without the
  end-of-turn token); `observations` are the messages that answer it (roles `tool`, `user` or `system`); the reward of
  the last step that returns one is the conversation's (0.0 when none does); `done` ends the conversation.
- optionally a `tools` attribute: JSON schemas of the tools it offers, given to chat templates that render tools
  (`apply_chat_template(..., tools=...)`).

`reset` is called once per example (the group's prompt); where the rollout branches, the instance is copied
(`copy.deepcopy`), so each of the G conversations of a group continues from its own copy of its parent's state.

The built-in `calculator` (:class:`CalculatorEnvironment`): arithmetic questions, a calculator tool, the answer checked.
"""
from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import re
from typing import Any, Protocol

from pg_deepspeed.grpo.prompts import check_prompt
from pg_deepspeed.grpo.rewards import RewardFunctions, import_named

OBSERVATION_ROLES = ("tool", "user", "system")


class EnvironmentFault(RuntimeError):
    """An environment returned something the rollout cannot use; the message names it, the conversation and turn."""


class Environment(Protocol):
    def reset(self, example: dict) -> list[dict]: ...

    def step(self, messages: list[dict]) -> tuple[list[dict], float | None, bool]: ...


def load_environment(spec: str) -> type:
    """The environment class `spec` names: a built-in name (`calculator`) or `module:Class`. ValueError, one line
    naming --environment, when it cannot be imported, is not a class, lacks `reset`/`step` or needs arguments."""
    if spec in BUILTIN_ENVIRONMENTS:
        return BUILTIN_ENVIRONMENTS[spec]
    where = f"--environment {spec!r}"
    if ":" not in spec:
        raise ValueError(f"{where}: expected a built-in name ({', '.join(sorted(BUILTIN_ENVIRONMENTS))}) or "
                         "'module:Class'")
    module_name, class_name = spec.split(":", 1)
    cls = import_named(spec, where)
    if cls is None:
        raise ValueError(f"{where}: module {module_name!r} has no {class_name!r}")
    if not inspect.isclass(cls):
        raise ValueError(f"{where}: {class_name!r} is a {type(cls).__name__}, not a class")
    for method in ("reset", "step"):
        if not callable(getattr(cls, method, None)):
            raise ValueError(f"{where}: class {class_name} has no {method} method (an environment defines "
                             "reset(example) and step(messages))")
    try:
        required = [p.name for p in inspect.signature(cls).parameters.values()
                    if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        required = []
    if required:
        raise ValueError(f"{where}: {class_name}() must take no arguments, its constructor requires "
                         f"{', '.join(required)}")
    return cls


def checked_reset(env: Any, example: dict, where: str) -> list[dict]:
    """`env.reset(example)`, checked: a well-formed conversation (prompts.check_prompt)."""
    name = type(env).__name__
    try:
        messages = env.reset(example)
    except Exception as e:
        raise EnvironmentFault(f"{name}.reset raised {type(e).__name__} ({e}) for {where}") from e
    if not isinstance(messages, list):
        raise EnvironmentFault(f"{name}.reset returned a {type(messages).__name__}, not a list of messages, "
                                f"for {where}")
    problem = check_prompt(messages)
    if problem is not None:
        raise EnvironmentFault(f"{name}.reset returned a conversation that cannot be a prompt for {where}: {problem}")
    return [dict(m) for m in messages]


def checked_step(env: Any, messages: list[dict], where: str) -> tuple[list[dict], float | None, bool]:
    """`env.step(messages)` (given a copy), checked: a list of observation messages with roles tool, user or system
    and text content, a finite reward or None, a bool."""
    name = type(env).__name__
    try:
        result = env.step([dict(m) for m in messages])
    except Exception as e:
        raise EnvironmentFault(f"{name}.step raised {type(e).__name__} ({e}) at {where}") from e
    if not (isinstance(result, tuple) and len(result) == 3):
        raise EnvironmentFault(f"{name}.step returned {type(result).__name__} at {where}, not a tuple "
                                "(observations, reward, done)")
    observations, reward, done = result
    if not isinstance(observations, list):
        raise EnvironmentFault(f"{name}.step returned observations of type {type(observations).__name__} at "
                                f"{where}, not a list of messages")
    for i, m in enumerate(observations):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in OBSERVATION_ROLES:
            raise EnvironmentFault(f"{name}.step observation {i} at {where} is not a {{'role', 'content'}} message "
                                    f"with a role among {OBSERVATION_ROLES} and text content: {m!r:.100}")
    if reward is not None:
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise EnvironmentFault(f"{name}.step returned the reward {reward!r} at {where}: a finite number or None")
        reward = float(reward)
    if not isinstance(done, bool):
        raise EnvironmentFault(f"{name}.step returned done={done!r} at {where}: a bool")
    return [dict(m) for m in observations], reward, done


# ---- the built-in calculator environment ----

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION = 200  # characters the calculator reads
_NUMBER = re.compile(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?")


def calculate(expression: str) -> str:
    """The value of an arithmetic expression (numbers, + - * / // % **, parentheses) as text, or `error: ...`.
    Nothing but arithmetic is evaluated (the expression is parsed, never `eval`ed); powers are bounded."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
                raise ValueError("power too large")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")

    text = expression.strip().replace("×", "*").replace("÷", "/")
    if not text or len(text) > MAX_EXPRESSION:
        return "error: expected an arithmetic expression of 1 to 200 characters"
    try:
        result = value(ast.parse(text, mode="eval").body)
    except ZeroDivisionError:
        return "error: division by zero"
    except (SyntaxError, ValueError, TypeError, OverflowError, RecursionError) as e:
        return f"error: {e}" if not isinstance(e, SyntaxError) else "error: not an arithmetic expression"
    if isinstance(result, float) and result.is_integer() and abs(result) < 1e15:
        result = int(result)
    return str(round(result, 10) if isinstance(result, float) else result)


_PLAIN_CALL = re.compile(r"<calculator>(.*?)</calculator>", re.DOTALL)
_JSON_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def tool_call(text: str) -> str | None:
    """The expression of the first calculator call in an assistant turn, in either format: the plain-text
    `<calculator>EXPR</calculator>`, or the Hermes/Qwen tool-call format that templates with tools teach,
    `<tool_call>{"name": "calculator", "arguments": {"expression": EXPR}}</tool_call>`; None when there is none."""
    plain, call = _PLAIN_CALL.search(text), _JSON_CALL.search(text)
    if plain is not None and (call is None or plain.start() < call.start()):
        return plain.group(1)
    if call is not None:
        try:
            data = json.loads(call.group(1))
            arguments = data.get("arguments", {})
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            if data.get("name") == "calculator" and isinstance(arguments.get("expression"), (str, int, float)):
                return str(arguments["expression"])
        except (ValueError, AttributeError):
            pass
        return ""  # a malformed call: answered with an error
    return None


def same_number(text: str, answer: str) -> bool:
    """Whether the last number in `text` equals the first number of `answer` (relative tolerance 1e-6)."""
    got, want = _NUMBER.findall(text.replace(",", "")), _NUMBER.search(str(answer).replace(",", ""))
    return bool(got) and want is not None and math.isclose(float(got[-1]), float(want.group()), rel_tol=1e-6,
                                                             abs_tol=1e-9)


class CalculatorEnvironment:
    """Arithmetic questions with a calculator tool; reward 1.0 for the right final answer, else 0.0.

    The question is the example's `prompt` (a string; e.g. `--task reasoning_gym:basic_arithmetic` or
    `reasoning_gym:chain_sum`), checked against its `answer`. Each assistant turn either calls the calculator, in
    the plain-text format `<calculator>EXPR</calculator>` (every template) or the `<tool_call>` JSON format of
    templates that render `tools` (:data:`tools` is given to them), and gets the result back as a `tool` message
    (a `user` message under templates without a tool role: see chat_turns.py); or it answers, `<answer>N</answer>`
    (else the turn's last number counts), which ends the conversation with the reward."""

    tools = [{"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string",
                                                                       "description": "e.g. (12 + 30) * 4"}},
                       "required": ["expression"]}}}]
    instructions = ("You may use a calculator: write <calculator>EXPRESSION</calculator> and end your turn, and its "
                    "result comes back. When you know the answer, write it as <answer>NUMBER</answer>.")

    def __init__(self) -> None:
        self.answer = ""
        self.tool_calls = 0

    def reset(self, example: dict) -> list[dict]:
        prompt = example["prompt"]
        if not isinstance(prompt, str):
            raise ValueError("the calculator environment asks questions given as text, not as a conversation")
        self.answer = str(example["answer"])
        return [{"role": "user", "content": f"{prompt.strip()}\n\n{self.instructions}"}]

    def step(self, messages: list[dict]) -> tuple[list[dict], float | None, bool]:
        text = messages[-1]["content"]
        answer = _ANSWER.search(text)
        expression = None if answer is not None else tool_call(text)
        if expression is not None:
            self.tool_calls += 1
            return [{"role": "tool", "content": calculate(expression)}], None, False
        return [], float(same_number(answer.group(1) if answer is not None else text, self.answer)), True


BUILTIN_ENVIRONMENTS: dict[str, type] = {"calculator": CalculatorEnvironment}


# ---- the environment's reward among the run's reward functions ----

ENVIRONMENT_REWARD = "environment"  # the reward function's name (metric reward/environment) and its column


def environment_reward(prompts: list[str], completions: list[str], answers: list[str],
                       environment: list[float]) -> list[float]:
    """The conversations' environment rewards (the `environment` column the multi-turn rollout fills)."""
    return [float(r) for r in environment]


environment_reward.__name__ = ENVIRONMENT_REWARD


def with_environment(rewards: RewardFunctions | None, weight: float = 1.0) -> RewardFunctions:
    """The run's reward with an environment: the environment's reward (weight `weight`, named `environment`) first,
    then the `--reward_fn` functions (None: the environment's alone), summed with their weights as RewardFunctions
    does. The other functions score the conversation's last assistant message as their completion."""
    if rewards is None:
        return RewardFunctions((environment_reward,), (float(weight),), (ENVIRONMENT_REWARD,))
    if ENVIRONMENT_REWARD in rewards.names:
        raise ValueError(f"--reward_fn names a function {ENVIRONMENT_REWARD!r}, the name of the --environment's "
                         "reward: rename it")
    return RewardFunctions((environment_reward, *rewards.functions), (float(weight), *rewards.weights),
                           (ENVIRONMENT_REWARD, *rewards.names))
