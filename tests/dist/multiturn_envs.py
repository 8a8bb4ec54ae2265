"""A user environment for tests/test_multiturn_train.py, loaded by the trainer as --environment
multiturn_envs:KeepsAsking (tests/dist on PYTHONPATH)."""


class KeepsAsking:
    """Asks for another try after every turn until --max_turns; the reward is the share of digits in the last
    answer (it varies between conversations, so advantages are not all zero)."""

    def reset(self, example: dict) -> list[dict]:
        # no whitespace: the character tokenizer loses some spaces on a round trip (not a chat model's tokenizer)
        return [{"role": "user", "content": "".join(example["prompt"].split())[-24:]}]

    def step(self, messages: list[dict]) -> tuple[list[dict], float | None, bool]:
        text = messages[-1]["content"]
        reward = sum(c.isdigit() for c in text) / max(len(text), 1)
        return [{"role": "user", "content": "Again?"}], reward, False
