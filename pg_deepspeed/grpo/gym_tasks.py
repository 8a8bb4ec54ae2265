"""Tasks of the `reasoning-gym` package (`--task reasoning_gym:<name>`, its generator's options in `--task_config`),
addressed by global index like every prompt source, and scored by each generator's own scorer."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import warnings
from collections import OrderedDict
from typing import Any

from pg_deepspeed.grpo.data import Example

REASONING_GYM = "reasoning_gym:"  # --task reasoning_gym:<name>
# reasoning-gym 0.1.25 generators whose entries depend on Python's hash seed (set iteration): the same index gives
# another entry in another process unless PYTHONHASHSEED is fixed (measured: every generator, PYTHONHASHSEED 1 and 2)
HASH_SEED_DEPENDENT = frozenset({"isomorphic_strings", "knight_swap", "polynomial_multiplication", "ransom_note"})


def is_reasoning_gym(task: str) -> bool:
    return task.startswith(REASONING_GYM)


def parse_task_config(text: str | None) -> dict[str, Any]:
    """`--task_config` (a JSON object of the generator's options) as a dict; {} when unset."""
    if text is None:
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--task_config {text!r} is not JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--task_config {text!r} must be a JSON object of the generator's options, "
                         f"e.g. '{{\"min_terms\": 2}}', not a {type(config).__name__}")
    return config


class ReasoningGymTask:
    """A generator of the `reasoning-gym` package (`--task reasoning_gym:<name>`, its options from `--task_config`),
    scored by that generator's own `score_answer`.

    reasoning-gym builds a dataset of `size` entries from one `seed` (most generators draw entry i from
    `Random(seed + i)`, some precompute all `size` of them, some refuse an index past `size`). Here the global index
    space is cut into blocks of BLOCK consecutive indices: example `index` is entry `index % BLOCK` of the dataset built
    with `size=BLOCK` and a seed hashed from (`seed`, the task, `index // BLOCK`) below 2**32 - BLOCK (a generator that
    seeds numpy from `seed + i` needs it under 2**32). So an example is a function of (seed, task, options, index)
    alone, for any index (the held-out and warm-up ones far away included), whatever order they are read in.

    The prompt is the entry's `question`, the answer its `answer` ("" for a generator whose scorer judges without
    one), and the entry itself (question, answer, metadata: JSON-able) is `Example.columns["entry"]`.
    """

    BLOCK = 1000
    extra_columns = ("entry",)

    def __init__(self, task: str, config: dict[str, Any], seed: int) -> None:
        try:
            from reasoning_gym.factory import DATASETS
        except ImportError as error:
            raise ImportError(f"--task {task}: the reasoning-gym package is not importable ({error}); "
                              "pip install reasoning-gym") from None
        name = task[len(REASONING_GYM):] if is_reasoning_gym(task) else task
        if name not in DATASETS:
            close = difflib.get_close_matches(name, DATASETS, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            some = ", ".join(sorted(set(close) | {"basic_arithmetic", "chain_sum", "needle_haystack", "gsm_symbolic"}))
            raise ValueError(f"--task {task}: reasoning-gym has no task {name!r}; {hint}its {len(DATASETS)} tasks "
                             f"include {some} (reasoning_gym.factory.DATASETS lists them)")
        config_cls = DATASETS[name][1]
        options = [f.name for f in dataclasses.fields(config_cls) if f.name not in ("seed", "size")]
        for key in config:
            if key in ("seed", "size"):
                raise ValueError(f"--task_config option {key!r}: the run sets it (each example's seed comes from "
                                 "--seed and its index); leave it out")
            if key not in options:
                raise ValueError(f"--task_config option {key!r}: reasoning_gym:{name} has no such option "
                                 f"(its options: {', '.join(options)})")
        self.task, self.config, self.seed = name, dict(config), seed
        self.name = f"{REASONING_GYM}{name}"
        if name in HASH_SEED_DEPENDENT and os.environ.get("PYTHONHASHSEED", "random") == "random":
            warnings.warn(f"--task {self.name}: this generator's entries depend on Python's hash seed, so a resumed "
                          "run (or another rank) reads other entries at the same indices unless PYTHONHASHSEED is "
                          "set (export PYTHONHASHSEED=0 before the launcher)")
        self._blocks: OrderedDict[int, Any] = OrderedDict()
        self._scorer = self._dataset(0)  # the generator checks the options here, at set-up

    def __len__(self) -> int:
        return 2**62

    def block_seed(self, block: int) -> int:
        digest = hashlib.sha256(f"{self.seed}:{self.name}:{block}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % (2**32 - self.BLOCK)

    def _dataset(self, block: int):
        """The generator of indices [block * BLOCK, (block + 1) * BLOCK), the few last used kept."""
        if block in self._blocks:
            self._blocks.move_to_end(block)
            return self._blocks[block]
        from reasoning_gym import create_dataset

        try:
            dataset = create_dataset(self.task, seed=self.block_seed(block), size=self.BLOCK,
                                     **copy.deepcopy(self.config))
        except Exception as error:  # the generator's own checks: AssertionError, TypeError, ValueError...
            raise self._refusal(error) from None
        self._blocks[block] = dataset
        if len(self._blocks) > 4:
            self._blocks.popitem(last=False)
        return dataset

    def _refusal(self, error: Exception) -> ValueError:
        """The generator's refusal of the options as one line, naming the option when one alone is refused."""
        from reasoning_gym import create_dataset

        reason = " ".join(str(error).split()) or type(error).__name__
        culprits = []
        for key, value in self.config.items():
            try:
                create_dataset(self.task, seed=0, size=1, **{key: copy.deepcopy(value)})
            except Exception:
                culprits.append(key)
        if len(culprits) == 1:
            key = culprits[0]
            return ValueError(f"--task_config option {key!r} ({json.dumps(self.config[key])}): "
                              f"reasoning_gym:{self.task} refuses it ({reason})")
        return ValueError(f"--task_config {json.dumps(self.config)}: reasoning_gym:{self.task} refuses it ({reason})")

    def entry(self, index: int) -> dict[str, Any]:
        """The generator's entry of `index` (a copy: what a reward function does to it changes nothing here)."""
        if index < 0:
            raise IndexError(f"{self.name}: negative index {index}")
        block, offset = divmod(index, self.BLOCK)
        return copy.deepcopy(self._dataset(block)[offset])

    def example(self, index: int) -> Example:
        entry = self.entry(index)
        answer = entry.get("answer")
        return Example(prompt=entry["question"], answer="" if answer is None else str(answer), columns={"entry": entry})

    def score_answer(self, answer: str | None, entry: dict[str, Any]) -> float:
        """The generator's own scorer (0.0 to 1.0) of `answer` to `entry`."""
        return float(self._scorer.score_answer(answer=answer, entry=entry))
