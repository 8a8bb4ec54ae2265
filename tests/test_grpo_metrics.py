"""Run outputs in one process: metrics.jsonl, TensorBoard scalars read back by TensorBoard, the reward plot."""
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pg_deepspeed.grpo.metrics import MetricsLogger, evaluation_summary, read_metrics


def _row(step: int) -> dict:
    return {"step": step, "loss": 0.5 / step, "reward_mean": 0.25 * step, "reward_std": 0.1, "accuracy": 0.2 * step}


def test_each_step_lands_in_jsonl_tensorboard_and_the_plot(tmp_path):
    logger = MetricsLogger(str(tmp_path), rank=0, total_steps=3)
    for step in (1, 2, 3):
        logger.log(_row(step))
    logger.close()
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == [_row(s) for s in (1, 2, 3)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for key in ("loss", "reward_mean", "reward_std", "accuracy"):
        scalars = events.Scalars(f"train/{key}")
        assert [e.step for e in scalars] == [1, 2, 3]
        assert [e.value for e in scalars] == pytest.approx([_row(s)[key] for s in (1, 2, 3)], rel=1e-6)
    assert (tmp_path / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "eval.png").exists()  # a run that never evaluates has no evaluation plot


def test_a_run_that_evaluates_gets_the_evaluation_plot(tmp_path):
    logger = MetricsLogger(str(tmp_path), rank=0, total_steps=2)
    logger.log({"step": 0, "eval/accuracy": 0.2, "eval/reward_mean": 0.4})
    for step in (1, 2):
        logger.log({**_row(step), "reward/format": 0.1 * step, "reward/math_accuracy": 0.3,
                    **({"eval/accuracy": 0.6, "eval/reward_mean": 0.7} if step == 2 else {})})
    logger.close()
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert evaluation_summary(read_metrics(str(tmp_path / "metrics.jsonl"))) == (
        "held-out greedy accuracy: 0.200 at step 0 -> 0.600 at step 2 (+0.400 over 2 evaluations)")


def test_a_resumed_logger_keeps_each_step_once(tmp_path):
    first = MetricsLogger(str(tmp_path), rank=0, total_steps=4)
    for step in (1, 2, 3):
        first.log(_row(step))
    first.close()
    resumed = MetricsLogger(str(tmp_path), rank=0, total_steps=4, start_step=2)
    resumed.log(_row(3))
    resumed.log(_row(4))
    resumed.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def test_other_ranks_write_nothing(tmp_path):
    logger = MetricsLogger(str(tmp_path / "out"), rank=1, total_steps=2)
    logger.log(_row(1))
    logger.close()
    assert not (tmp_path / "out").exists()
