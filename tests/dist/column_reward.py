"""A reward that reads a dataset column by keyword, for `--reward_fn column_reward:scaled_length` with tests/dist on
PYTHONPATH: the completion's length in characters times the row's `scale` column. `scale` is keyword-only and has no
default, so the call fails unless the trainer passes the column; the value is never 0 for a completion of at least one
character, so a weighted sum with it is visible in the metrics."""


def scaled_length(prompts: list[str], completions: list[str], answers: list[str], *, scale: list[float]) -> list[float]:
    return [s * len(text) for text, s in zip(completions, scale)]
