"""A reward that varies between the completions of a random-init model (so GRPO's advantages are not all 0):
the share of digits in the completion's text. For `--reward_fn varied_reward:digit_share` with tests/dist on
PYTHONPATH."""


def digit_share(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]
