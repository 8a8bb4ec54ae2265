"""Prompts and answers: built-in synthetic long-context tasks, a reasoning-gym generator, or a local dataset (a file
or a folder).

Every example is addressed by a global index, so the data position of a run is one integer
(the number of rollout steps done) and a resumed run reads exactly what the original would have.
"""
from __future__ import annotations

import copy
import os
import random
import string
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
    from pg_deepspeed.grpo.gym_tasks import ReasoningGymTask, is_reasoning_gym, parse_task_config  # (it imports us)

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
