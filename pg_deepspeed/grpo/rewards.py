"""Verifiable rewards: built-in task rewards, exact and numeric match, or a user's `module:function`.

A reward function is called as `f(prompts, completions, answers) -> list[float]`, one float per completion.
Whatever it returns is checked; a function that raises, returns the wrong length or a NaN stops the run
with a message naming it.
"""
from __future__ import annotations

import importlib
import math
import re
from typing import Callable, Sequence

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], Sequence[float]]
_NUMBER = re.compile(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?")


class RewardError(RuntimeError):
    """A reward function misbehaved; the message names it."""


def exact_match(prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """1.0 where the completion, stripped, equals the answer."""
    return [float(c.strip() == a.strip()) for c, a in zip(completions, answers)]


def numeric_match(prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """1.0 where the first number in the completion equals the answer's number (relative tolerance 1e-6)."""
    rewards = []
    for c, a in zip(completions, answers):
        got, want = _NUMBER.search(c), _NUMBER.search(a)
        rewards.append(float(got is not None and want is not None and math.isclose(
            float(got.group()), float(want.group()), rel_tol=1e-6, abs_tol=1e-9)))
    return rewards


def digit_answer(format_reward: float) -> RewardFn:
    """Built-in tasks: 1.0 for the right digit alone, `format_reward` for a wrong digit alone, else 0."""

    def reward(prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]) -> list[float]:
        out = []
        for c, a in zip(completions, answers):
            c = c.strip()
            out.append(1.0 if c == a else format_reward if len(c) == 1 and c.isdigit() else 0.0)
        return out

    reward.__name__ = "digit_answer"
    return reward


BUILTIN = {"exact_match": exact_match, "numeric_match": numeric_match}


def resolve_reward_fn(spec: str | None, *, synthetic: bool, format_reward: float) -> RewardFn:
    """`spec` is None (the task's default), a built-in name, or `module:function`."""
    if spec is None:
        return digit_answer(format_reward) if synthetic else exact_match
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise ValueError(f"--reward_fn {spec!r}: expected one of {sorted(BUILTIN)} or 'module:function'")
    module_name, fn_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--reward_fn {spec!r}: cannot import module {module_name!r} ({e})") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"--reward_fn {spec!r}: module {module_name!r} has no callable {fn_name!r}")
    return fn


def compute_rewards(
    fn: RewardFn, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]
) -> list[float]:
    """Call `fn` and check what it returns: one finite float per completion."""
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        values = list(fn(list(prompts), list(completions), list(answers)))
    except Exception as e:
        raise RewardError(f"reward function {name} raised {type(e).__name__}: {e}") from e
    if len(values) != len(completions):
        raise RewardError(f"reward function {name} returned {len(values)} rewards for {len(completions)} completions")
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward function {name} returned a non-number: {e}") from e
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise RewardError(f"reward function {name} returned NaN/inf for completion(s) {bad[:8]}")
    return values
