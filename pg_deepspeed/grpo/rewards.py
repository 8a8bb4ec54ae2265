"""Verifiable rewards: built-in task rewards, exact, numeric and math match, an answer-format check, or a user's
`module:function`; one or more of them, weighted and summed.

A reward function is called as `f(prompts, completions, answers, **columns) -> list[float]`, one float per
completion: the three lists positionally, then the example's other dataset columns (one list each, one value per
completion) by keyword, but only those the function asks for: every column when it has a `**kwargs` parameter, else
the columns named by its parameters after the first three. A function of the three lists alone gets no keyword.
Whatever it returns is checked; a function that raises, returns the wrong length or a NaN stops the run with a
message naming it.

`--reward_fn a b` with `--reward_weights wa wb`: the reward of a completion is `wa * a + wb * b`
(:class:`RewardFunctions`); advantages are computed from it, and each function's own mean is logged as `reward/<name>`.

A `--task reasoning_gym:<name>` is scored by default by `reasoning_gym` (:func:`make_reasoning_gym`): the
generator's own scorer, given the completion's answer and the example's entry.
"""
from __future__ import annotations

import importlib
import inspect
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

RewardFn = Callable[..., Sequence[float]]
_NUMBER = re.compile(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?")
DEFAULT_FORMAT_PATTERN = r"<answer>(.*?)</answer>"
_LATEX_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")


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


def compile_format_pattern(pattern: str) -> re.Pattern:
    """`--format_pattern` compiled with re.DOTALL (an answer may span lines); ValueError naming it if it is no regex."""
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ValueError(f"--format_pattern {pattern!r} is not a regular expression: {e}") from None


def make_format(pattern: str = DEFAULT_FORMAT_PATTERN) -> RewardFn:
    """The built-in `format`: 1.0 where `pattern` (a regex, re.DOTALL) is found in the completion, else 0.

    Found anywhere (`re.search`): anchor it with `^...$` to require that the completion be the pattern alone."""
    regex = compile_format_pattern(pattern)

    def reward(prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]) -> list[float]:
        return [float(regex.search(c) is not None) for c in completions]

    reward.__name__ = "format"
    return reward


def answer_content(completion: str, regex: re.Pattern) -> str:
    """What the last match of the answer pattern holds (its first group; the whole match when it has no group), or
    the whole completion when the pattern is not found."""
    matches = list(regex.finditer(completion))
    if not matches:
        return completion
    last = matches[-1]
    return last.group(1) if regex.groups else last.group(0)


def parse_gold(answer: str) -> list:
    """A dataset answer as math-verify reads it, LaTeX or a plain number: wrapped in `$...$` first unless it already
    has a LaTeX delimiter (math-verify finds bare `\\sqrt{2}`, `\\pi` or `x+1` only inside one), then as it is."""
    from math_verify import parse

    wrapped = f"${answer}$"
    tries = (answer, wrapped) if any(d in answer for d in _LATEX_DELIMITERS) else (wrapped, answer)
    for text in tries:
        parsed = parse(text)
        if parsed:
            return parsed
    return []


def make_math_accuracy(pattern: str = DEFAULT_FORMAT_PATTERN) -> RewardFn:
    """The built-in `math_accuracy`: 1.0 where the completion's answer is mathematically equal to the dataset's,
    through Hugging Face's math-verify (`verify(parse(gold), parse(prediction))`, gold first: verify is not
    symmetric), else 0.

    The prediction is the content of the completion's last answer tag (`pattern`, `--format_pattern`: its first
    group) when it has one, else the whole completion; math-verify then takes a `\\boxed{}`, a `$...$` or the
    number after "answer is", else the last number it finds. Equal means equal as numbers or symbols: 1/2, 0.5 and
    \\frac{1}{2} alike (tests/test_rewards.py holds the table measured). An answer that math-verify cannot parse
    (not mathematics) scores 0 for every completion, with a warning."""
    regex = compile_format_pattern(pattern)

    def reward(prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]) -> list[float]:
        from math_verify import parse, verify

        golds: dict[str, list] = {}  # each answer repeats G times
        out = []
        for c, a in zip(completions, answers):
            if a not in golds:
                golds[a] = parse_gold(a)
                if not golds[a]:
                    warnings.warn(f"math_accuracy: math-verify cannot parse the answer {a!r}; it scores 0")
            gold = golds[a]
            out.append(float(bool(gold) and verify(gold, parse(answer_content(c, regex)))))
        return out

    reward.__name__ = "math_accuracy"
    return reward


REASONING_GYM_REWARD = "reasoning_gym"  # the --reward_fn name of a reasoning-gym task's own scorer


def reasoning_gym_answer(completion: str) -> str:
    """What a reasoning-gym scorer is given: the content of the completion's last `<answer>...</answer>` tag,
    stripped (reasoning-gym's own `utils.extract_answer`), or the whole completion, stripped, when it has none."""
    from reasoning_gym.utils import extract_answer

    answer = extract_answer(completion)
    return completion.strip() if answer is None else answer


def make_reasoning_gym(score_answer: Callable[[str, dict], float], task: str = "") -> RewardFn:
    """The built-in `reasoning_gym`: `score_answer(answer, entry)` (the task's generator's own scorer, 0.0 to 1.0)
    of each completion's answer (:func:`reasoning_gym_answer`) against its example's entry (the `entry` column).
    A completion the scorer raises on (some scorers parse the answer: `int("abc")`) scores 0, with one warning per
    run naming the task and the error."""
    warned = []

    def reward(prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str],
               entry: Sequence[dict]) -> list[float]:
        out = []
        for completion, e in zip(completions, entry):
            try:
                out.append(float(score_answer(reasoning_gym_answer(completion), e)))
            except Exception as error:  # a scorer choking on a malformed answer: that answer is wrong
                if not warned:
                    warned.append(error)
                    warnings.warn(f"reasoning_gym: the scorer of {task or 'the task'} raised {type(error).__name__} "
                                  f"({error}) on an answer; such answers score 0 (warned once)")
                out.append(0.0)
        return out

    reward.__name__ = REASONING_GYM_REWARD
    return reward


# the built-ins by --reward_fn name, each made from --format_pattern (which only math_accuracy and format read)
BUILTIN: dict[str, Callable[[str], RewardFn]] = {
    "exact_match": lambda pattern: exact_match, "numeric_match": lambda pattern: numeric_match,
    "math_accuracy": make_math_accuracy, "format": make_format,
}


def resolve_reward_fn(spec: str | None, *, synthetic: bool, format_reward: float,
                      format_pattern: str = DEFAULT_FORMAT_PATTERN,
                      task_scorer: Callable[[str, dict], float] | None = None, task: str = "") -> RewardFn:
    """`spec` is None (the task's default), a built-in name, or `module:function`. `task_scorer`: a reasoning-gym
    task's `score_answer` (`task` its name), which makes `reasoning_gym` the default; else that name is refused."""
    if spec is None:
        if task_scorer is not None:
            return make_reasoning_gym(task_scorer, task)
        return digit_answer(format_reward) if synthetic else exact_match
    if spec == REASONING_GYM_REWARD:
        if task_scorer is None:
            data = f"--task {task}" if task else "this data"
            raise ValueError(f"--reward_fn {REASONING_GYM_REWARD} scores with a reasoning-gym task's own scorer: it "
                             f"needs --task reasoning_gym:<name>, not {data}")
        return make_reasoning_gym(task_scorer, task)
    if spec in BUILTIN:
        return BUILTIN[spec](format_pattern)
    if ":" not in spec:
        raise ValueError(f"--reward_fn {spec!r}: expected one of {sorted([*BUILTIN, REASONING_GYM_REWARD])} or "
                         "'module:function'")
    fn = import_named(spec, f"--reward_fn {spec!r}")
    if not callable(fn):
        module_name, fn_name = spec.split(":", 1)
        raise ValueError(f"--reward_fn {spec!r}: module {module_name!r} has no callable {fn_name!r}")
    return fn


def import_named(spec: str, where: str) -> object:
    """What `module:name` names (a reward function, an environment class), or None when the module lacks it;
    ValueError naming `where` when the module cannot be imported."""
    module_name, name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raised while importing
        raise ValueError(f"{where}: cannot import module {module_name!r} ({type(e).__name__}: {e})") from None
    return getattr(module, name, None)


def reward_specs(value: str | Sequence[str] | None) -> list[str]:
    """`--reward_fn` as a list of specs: each item split on whitespace (so `--reward_fn "a b"` = `--reward_fn a b`);
    [] when unset."""
    if value is None:
        return []
    return [spec for item in ([value] if isinstance(value, str) else value) for spec in str(item).split()]


def reward_weights(value: str | Sequence[float] | None, count: int, default: bool = False) -> list[float]:
    """`--reward_weights` checked against the `count` reward functions (`default`: --reward_fn is unset, the task's
    one function): one finite weight each, 1.0 each when unset. ValueError naming both options on a count mismatch."""
    if value is None:
        return [1.0] * count
    items = value.split() if isinstance(value, str) else list(value)
    try:
        weights = [float(w) for w in items]
    except (TypeError, ValueError) as e:
        raise ValueError(f"--reward_weights {value!r}: not numbers ({e})") from None
    if len(weights) != count:
        functions = ("is unset (the task's one default function)" if default else
                     f"names {count} function{'s' * (count != 1)}")
        raise ValueError(f"--reward_weights has {len(weights)} weight{'s' * (len(weights) != 1)} but --reward_fn "
                         f"{functions}: give one weight per function, in order")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise ValueError(f"--reward_weights must be finite numbers, got {bad[0]}")
    return weights


def check_reward_options(reward_fn: str | Sequence[str] | None, weights: str | Sequence[float] | None,
                         format_pattern: str) -> None:
    """The cheap checks of the reward options (no import): counts, weights, the pattern."""
    specs = reward_specs(reward_fn)
    reward_weights(weights, max(1, len(specs)), default=not specs)
    compile_format_pattern(format_pattern)


def function_name(fn: Callable, spec: str | None = None) -> str:
    """What `reward/<name>` calls the function: its `__name__`; for one without (a partial, a callable object) or a
    lambda, the name it was given as (`module:name`), else its class's name."""
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or not name or name == "<lambda>":
        name = spec.rsplit(":", 1)[-1] if spec else type(fn).__name__
    return name


@dataclass(frozen=True)
class KeywordColumns:
    """Which dataset columns a reward function receives by keyword: `every` (a `**kwargs` parameter) or `named`;
    `positional`: the names of its first three parameters (never passed again by keyword); `required`: keyword
    parameters without a default (the dataset must have them)."""

    every: bool
    named: frozenset[str]
    positional: frozenset[str]
    required: frozenset[str]

    def pick(self, columns: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in columns.items()
                if k not in self.positional and (self.every or k in self.named)}


def keyword_columns(fn: Callable) -> KeywordColumns:
    """Read `fn`'s signature: the three positional lists, then the columns it asks for by name or by `**kwargs`."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature (some builtins): the three lists only
        return KeywordColumns(False, frozenset(), frozenset(), frozenset())
    P = inspect.Parameter
    positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    takes_three = any(p.kind is P.VAR_POSITIONAL for p in params) or len(positional) >= 3
    if not takes_three:
        raise TypeError(f"takes {len(positional)} positional argument{'s' * (len(positional) != 1)}; it is called "
                        "as f(prompts, completions, answers, **columns)")
    first, rest = positional[:3], [p for p in params if p not in positional[:3]]
    named = [p for p in rest if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)]
    return KeywordColumns(
        every=any(p.kind is P.VAR_KEYWORD for p in params),
        named=frozenset(p.name for p in named),
        positional=frozenset(p.name for p in first),
        required=frozenset(p.name for p in named if p.default is P.empty),
    )


def compute_rewards(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str],
                    columns: Mapping[str, Sequence] | None = None, *, name: str | None = None) -> list[float]:
    """Call `fn` (with the `columns` it asks for by keyword) and check what it returns: one finite float per
    completion. `name`: what the messages call it (default its `__qualname__`)."""
    name = name or getattr(fn, "__qualname__", repr(fn))
    try:
        kwargs = keyword_columns(fn).pick(columns or {})
        values = list(fn(list(prompts), list(completions), list(answers), **kwargs))
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


@dataclass(frozen=True)
class RewardFunctions:
    """The run's reward: `functions` with their `weights` (one each) and `names` (their metrics, `reward/<name>`).

    The reward of a completion is the weighted sum of what each function returned. `accuracy` is the share of
    completions on which every function with a positive weight returned 1.0, its best value for the built-ins
    (with one function of weight 1, as by default: reward == 1.0); functions with a weight <= 0 do not count, and
    with no positive weight it is 0. A user function whose best value is not 1.0 keeps the accuracy at 0."""

    functions: tuple[RewardFn, ...]
    weights: tuple[float, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not len(self.functions) == len(self.weights) == len(self.names) >= 1:
            raise ValueError(f"{len(self.functions)} reward functions, {len(self.weights)} weights and "
                             f"{len(self.names)} names: need one of each, at least one")
        seen = set()
        for name in self.names:
            if name in seen:
                raise ValueError(f"--reward_fn names two functions {name!r}: their metrics reward/{name} would "
                                 "collide (rename one)")
            seen.add(name)

    def score(self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str],
              columns: Mapping[str, Sequence] | None = None) -> tuple[list[float], list[list[float]]]:
        """-> (the weighted rewards [N], each function's own [K][N]), every function checked by
        :func:`compute_rewards`."""
        parts = [compute_rewards(fn, prompts, completions, answers, columns, name=name)
                 for fn, name in zip(self.functions, self.names)]
        total = [math.fsum(w * part[i] for w, part in zip(self.weights, parts)) for i in range(len(completions))]
        return total, parts

    def accuracy(self, parts: Sequence[Sequence[float]]) -> float:
        """Share of completions whose every positively weighted function returned 1.0; `parts` is [K][N]."""
        counted = [part for part, w in zip(parts, self.weights) if w > 0]
        if not counted or not counted[0]:
            return 0.0
        n = len(counted[0])
        return sum(all(part[i] == 1.0 for part in counted) for i in range(n)) / n

    def check_columns(self, available: Sequence[str], where: str) -> None:
        """Refuse a function whose keyword parameters without a default are not columns of the data (`where`)."""
        for fn, name in zip(self.functions, self.names):
            missing = sorted(keyword_columns(fn).required - set(available))
            if missing:
                have = ", ".join(available) if available else "none besides prompt and answer"
                raise ValueError(f"--reward_fn {name} asks for the column(s) {', '.join(missing)} that {where} does "
                                 f"not have (its other columns: {have})")


def resolve_rewards(reward_fn: str | Sequence[str] | None, weights: str | Sequence[float] | None, *, synthetic: bool,
                    format_reward: float, format_pattern: str = DEFAULT_FORMAT_PATTERN,
                    task_scorer: Callable[[str, dict], float] | None = None, task: str = "") -> RewardFunctions:
    """`--reward_fn` (None: the task's default; else one or more specs) and `--reward_weights` as a
    :class:`RewardFunctions`; `task_scorer`, `task`: a reasoning-gym task's (see :func:`resolve_reward_fn`).
    ValueError naming the option for anything wrong."""
    specs = reward_specs(reward_fn)
    weights = reward_weights(weights, max(1, len(specs)), default=not specs)
    fns = []
    for spec in specs or [None]:
        fn = resolve_reward_fn(spec, synthetic=synthetic, format_reward=format_reward, format_pattern=format_pattern,
                               task_scorer=task_scorer, task=task)
        try:
            keyword_columns(fn)
        except TypeError as e:
            raise ValueError(f"--reward_fn {spec}: {function_name(fn, spec)} {e}") from None
        fns.append(fn)
    names = tuple(function_name(fn, spec) for fn, spec in zip(fns, specs or [None]))
    return RewardFunctions(tuple(fns), tuple(weights), names)


def row_columns(rows: Sequence[Mapping[str, Any]], repeat: int) -> dict[str, list]:
    """Per-example column dicts -> one list per column, each value repeated `repeat` times (the G completions of a
    prompt), as reward functions receive them."""
    names = list(rows[0]) if rows else []
    return {k: [r.get(k) for r in rows for _ in range(repeat)] for k in names}
