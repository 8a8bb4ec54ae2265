"""Prompts and answers: built-in synthetic long-context tasks, a reasoning-gym generator, or a local dataset (a file
or a folder).

Every example is addressed by a global index, so the data position of a run is one integer
(the number of rollout steps done) and a resumed run reads exactly what the original would have.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import random
import string
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from pg_deepspeed.grpo.prompts import Prompt, PromptFormat, check_prompt


@dataclass(frozen=True)
class Example:
    prompt: Prompt  # a string or a conversation (list of messages): see prompts.py
    answer: str
    # a dataset row's other fields by name, for the reward functions that ask for them (not hashed: values may be lists)
    columns: dict[str, Any] = field(default_factory=dict, hash=False)


class PromptSource(Protocol):
    name: str

    def __len__(self) -> int: ...

    def example(self, index: int) -> Example: ...


class SyntheticTask:
    """A generated task: example `index` comes from a RNG seeded by (seed, task, index), endlessly."""

    name = "synthetic"

    def __init__(self, prompt_length: int, seed: int) -> None:
        self.prompt_length, self.seed = prompt_length, seed

    def __len__(self) -> int:
        return 2**62

    def rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{self.name}:{index}")


class NeedleDigitTask(SyntheticTask):
    """Needle in a haystack: one digit hidden in a long run of letters; the answer is that digit."""

    name = "needle"

    def example(self, index: int) -> Example:
        rng = self.rng(index)
        letters = rng.choices(string.ascii_lowercase, k=max(2, self.prompt_length - len("text:\ndigit=")))
        answer = str(rng.randrange(10))
        letters[rng.randrange(len(letters))] = answer
        return Example(prompt="text:" + "".join(letters) + "\ndigit=", answer=answer)


class MajorityDigitTask(SyntheticTask):
    """'Which digit occurs most often?' over a long list of digits; the answer is one digit.

    The majority digit holds about 40% of the list, so the answer depends on the whole prompt.
    """

    name = "majority"

    def example(self, index: int) -> Example:
        rng = self.rng(index)
        top = rng.randrange(10)
        others = [d for d in range(10) if d != top]
        count = max(4, (self.prompt_length - len("digits:\nmost=")) // 2)
        digits = [top if rng.random() < 0.4 else rng.choice(others) for _ in range(count)]
        answer = int(np.argmax(np.bincount(digits, minlength=10)))
        return Example(prompt="digits:" + " ".join(map(str, digits)) + "\nmost=", answer=str(answer))


class KVRetrievalTask(SyntheticTask):
    """Key-value retrieval from a long haystack: 'ab=3;cd=7;...' then 'ab?'; the answer is the value."""

    name = "kv_retrieval"

    def example(self, index: int) -> Example:
        rng = self.rng(index)
        pairs = max(2, (self.prompt_length - len("kv:\n??=")) // 5)
        keys = set()
        while len(keys) < pairs:
            keys.add("".join(rng.choices(string.ascii_lowercase, k=2)))
        keys = sorted(keys, key=lambda _: rng.random())
        values = [str(rng.randrange(10)) for _ in keys]
        i = rng.randrange(len(keys))
        haystack = ";".join(f"{k}={v}" for k, v in zip(keys, values))
        return Example(prompt=f"kv:{haystack}\n{keys[i]}?=", answer=values[i])


TASKS = {"needle": NeedleDigitTask, "majority": MajorityDigitTask, "kv_retrieval": KVRetrievalTask}
SFT_OFFSET = 2**61  # the supervised warm-up's examples are indexed from here, far from the GRPO ones


@dataclass(frozen=True)
class Curriculum:
    """Prompt lengths that grow by doubling: `start`, 2·start, ... up to `final`, each stage an equal share of the
    first `steps` GRPO steps; `final` from then on. The supervised warm-up reads the first stage."""

    start: int
    final: int
    steps: int

    def __post_init__(self) -> None:
        if not 1 <= self.start < self.final:
            raise ValueError(f"a curriculum must start between 1 and the final prompt length {self.final} "
                             f"(exclusive), got {self.start}")
        if self.steps < 1:
            raise ValueError(f"a curriculum needs at least one step to grow over, got {self.steps}")

    def stages(self) -> list[int]:
        lengths = [self.start]
        while lengths[-1] < self.final:
            lengths.append(min(2 * lengths[-1], self.final))
        return lengths

    def length(self, step: int) -> int:
        """Prompt length of GRPO step `step` (0-based)."""
        stages = self.stages()
        return self.final if step >= self.steps else stages[step * len(stages) // self.steps]


class CurriculumTask:
    """A synthetic task whose prompts follow a :class:`Curriculum`. Example `index` belongs to GRPO step
    ``index // examples_per_step`` (:func:`batch_indices`'s numbering), and the warm-up's (>= SFT_OFFSET) to step 0,
    so a resumed run reads exactly what the original would have."""

    def __init__(self, task: type[SyntheticTask], curriculum: Curriculum, seed: int, examples_per_step: int) -> None:
        self.curriculum, self.examples_per_step = curriculum, examples_per_step
        self.tasks = {n: task(n, seed) for n in curriculum.stages()}
        self.final_task = self.tasks[curriculum.final]
        self.name = f"{self.final_task.name} (curriculum {'/'.join(map(str, curriculum.stages()))})"

    def __len__(self) -> int:
        return 2**62

    def step_of(self, index: int) -> int:
        return 0 if index >= SFT_OFFSET else index // self.examples_per_step

    def example(self, index: int) -> Example:
        return self.tasks[self.curriculum.length(self.step_of(index))].example(index)


class FileDataset:
    """A local dataset read with `datasets`: a .jsonl/.json/.parquet/.csv file, a folder `datasets.load_dataset` opens
    (data files), or one `Dataset.save_to_disk` wrote. Its `prompt` column holds strings or conversations (lists of
    `{"role", "content"}` messages, TRL's conversational format); `answer_column` holds the answers. Every row is
    checked when it is opened: a bad one is refused naming its index. Every other column is kept per row
    (`Example.columns`, `extra_columns`: reward functions may ask for them by keyword)."""

    def __init__(self, path: str, seed: int, answer_column: str = "answer") -> None:
        data = _load_local_dataset(path)
        for column in ("prompt", answer_column):
            if column not in data.column_names:
                option = " (--answer_column)" if column == answer_column and column != "answer" else ""
                raise ValueError(f"--dataset {path!r} has no {column!r} column{option} (columns: {data.column_names})")
        if len(data) == 0:
            raise ValueError(f"--dataset {path!r} is empty")
        prompts, answers = data["prompt"], data[answer_column]
        for row, (prompt, answer) in enumerate(zip(prompts, answers)):
            problem = check_prompt(prompt)
            if problem is not None:
                raise ValueError(f"--dataset {path!r} row {row}: {problem}")
            if answer is None:
                raise ValueError(f"--dataset {path!r} row {row}: missing {answer_column!r}")
        self.name, self.path, self.seed = os.path.basename(os.path.normpath(path)), path, seed
        self.prompts = [p if isinstance(p, str) else [dict(m) for m in p] for p in prompts]
        self.answers = [str(a) for a in answers]
        self.extra_columns = tuple(c for c in data.column_names if c not in ("prompt", answer_column))
        self._columns = {c: data[c] for c in self.extra_columns}
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self, rows: Sequence[int]) -> "FileDataset":
        """The same dataset restricted to `rows` (in that order), shuffled per epoch by the same seed."""
        part = copy.copy(self)
        part.prompts, part.answers = [self.prompts[r] for r in rows], [self.answers[r] for r in rows]
        part._columns = {c: [values[r] for r in rows] for c, values in self._columns.items()}
        part._orders = {}
        return part

    def hold_out(self, n: int) -> tuple["FileDataset", "FileDataset"]:
        """(training rows, `n` held-out rows): the held-out ones are the first `n` of a permutation seeded apart from
        the training shuffles, and the training set never reads them."""
        if not 0 < n < len(self):
            raise ValueError(f"--eval_examples {n}: holding out that many of --dataset {self.path!r}'s {len(self)} "
                             "rows leaves none (or nothing to hold out)")
        order = np.random.default_rng([self.seed, 2**32 - 1]).permutation(len(self)).tolist()
        return self.rows(sorted(order[n:])), self.rows(sorted(order[:n]))

    def example(self, index: int) -> Example:
        """Row of `index` in a fresh seeded shuffle per epoch. Its other columns are copies: whatever a reward
        function does to them, example(index) stays a function of index alone."""
        epoch, offset = divmod(index, len(self))
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self))}
        return self.at(int(self._orders[epoch][offset]))

    def at(self, row: int) -> Example:
        """Row `row` of the file (no shuffle)."""
        return Example(self.prompts[row], self.answers[row],
                       {c: copy.deepcopy(values[row]) for c, values in self._columns.items()})


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


def _load_local_dataset(path: str):
    """The train split of a local dataset (see FileDataset); a missing path or an unreadable one is named."""
    import datasets

    if os.path.isfile(path):
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(
            os.path.splitext(path)[1].lower())
        if kind is None:
            raise ValueError(f"--dataset {path!r}: expected a .jsonl, .json, .parquet or .csv file, or a folder")
        try:
            return datasets.load_dataset(kind, data_files=path, split="train")
        except Exception as error:  # datasets' own errors (mixed column types, bad JSON) name no row of ours
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(f"--dataset {path!r}: datasets cannot read it ({type(error).__name__}: {first})") from None
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--dataset {path!r} does not exist (a local file or folder)")
    if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(os.path.join(path, "dataset_dict.json")):
        data = datasets.load_from_disk(path)  # what Dataset(Dict).save_to_disk wrote
        return data["train"] if isinstance(data, datasets.DatasetDict) else data
    try:
        return datasets.load_dataset(path, split="train")
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"--dataset {path!r}: datasets cannot open it as a local dataset ({error})") from None


def build_source(task: str, dataset: str | None, prompt_length: int, seed: int,
                 curriculum: Curriculum | None = None, examples_per_step: int = 1,
                 answer_column: str = "answer", task_config: str | None = None) -> PromptSource:
    """A file dataset, a reasoning-gym task (`reasoning_gym:<name>`, its generator's options the JSON `task_config`),
    or a built-in task (whose prompts follow `curriculum` when given: `examples_per_step` is the number of prompts
    all ranks read per GRPO step)."""
    if task_config is not None and (dataset is not None or not is_reasoning_gym(task)):
        where = "a --dataset" if dataset is not None else f"--task {task}"
        raise ValueError(f"--task_config holds the options of a --task reasoning_gym:<name> generator; {where} "
                         "takes none")
    if dataset is not None:
        if curriculum is not None:
            raise ValueError("--curriculum_start_length grows the built-in tasks' prompts; a --dataset's prompts are "
                             "read as they are (leave it unset or 0)")
        return FileDataset(dataset, seed, answer_column)
    if is_reasoning_gym(task):
        if curriculum is not None:
            raise ValueError(f"--curriculum_start_length grows the built-in synthetic tasks' prompts; --task {task}'s "
                             "prompts are its generator's (their difficulty is --task_config's; leave it unset or 0)")
        return ReasoningGymTask(task, parse_task_config(task_config), seed)
    if task not in TASKS:
        raise ValueError(f"unknown --task {task!r}; built-in tasks: {sorted(TASKS)}, or reasoning_gym:<name> "
                         "(a reasoning-gym generator)")
    if curriculum is not None:
        return CurriculumTask(TASKS[task], curriculum, seed, examples_per_step)
    return TASKS[task](prompt_length, seed)


def batch_indices(step: int, rank: int, world_size: int, per_rank: int) -> range:
    """Global example indices this rank reads at rollout `step`."""
    start = (step * world_size + rank) * per_rank
    return range(start, start + per_rank)


def longest_prompt(prompt_format: PromptFormat, source: PromptSource, sample: int = 64) -> tuple[int, int]:
    """(length in tokens, index) of the longest prompt as the model sees it: every row of a file (each rendered, so a
    row the format cannot render is refused naming its index), or `sample` synthetic ones."""
    if isinstance(source, CurriculumTask):
        source = source.final_task  # the curriculum's longest prompts
    if isinstance(source, FileDataset):
        lengths = []
        for row, prompt in enumerate(source.prompts):
            try:
                lengths.append(len(prompt_format.token_ids(prompt)))
            except ValueError as error:
                raise ValueError(f"--dataset {source.path!r} row {row}: {error}") from None
        i = int(np.argmax(lengths))
        return lengths[i], i
    lengths = [len(prompt_format.token_ids(source.example(i).prompt)) for i in range(sample)]
    i = int(np.argmax(lengths))
    return lengths[i], i
