"""Run outputs on rank 0: a tqdm bar, metrics.jsonl, completions.jsonl, the trackers of --report_to (tracking.py) and
the plots (reward.png; eval.png when the run evaluates)."""
from __future__ import annotations

import json
import os

from tqdm.auto import tqdm

from pg_deepspeed.grpo.tracking import build_trackers


class MetricsLogger:
    """Writes one JSON object per step to `metrics.jsonl` and the same scalars to the trackers (`report_to`:
    tensorboard, wandb; see tracking.py).

    Every rank may construct it; only rank 0 writes. On resume, lines past the resumed step are dropped
    so the file holds each step exactly once.
    """

    def __init__(self, output_dir: str, *, rank: int, total_steps: int, start_step: int = 0,
                 report_to: tuple[str, ...] = ("tensorboard",), project: str = "pg_deepspeed",
                 config: dict | None = None) -> None:
        self.enabled = rank == 0
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.completions_path = os.path.join(output_dir, "completions.jsonl")
        self.output_dir = output_dir
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        for path in (self.path, self.completions_path):
            truncate_after(path, start_step)
        self.trackers = build_trackers(list(report_to), output_dir, start_step, project, config or {})
        self.bar = tqdm(total=total_steps, initial=start_step, desc="grpo", dynamic_ncols=True)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for tracker in self.trackers:
            tracker.log(metrics, metrics["step"])
        if "reward_mean" not in metrics:  # the evaluation before any GRPO step
            return
        self.bar.update(1)
        self.bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics['loss']:.4f}")

    def log_completions(self, step: int, samples: list[dict]) -> None:
        """One row per sampled completion in completions.jsonl: the step, the prompt as the model saw it (template
        included), the completion and its reward(s)."""
        if not self.enabled:
            return
        with open(self.completions_path, "a") as f:
            f.writelines(json.dumps({"step": step, **sample}) + "\n" for sample in samples)
        for tracker in self.trackers:
            tracker.log_completions(step, samples)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        for tracker in self.trackers:
            tracker.close()
        plot_rewards(self.path, os.path.join(self.output_dir, "reward.png"))
        plot_evaluation(self.path, os.path.join(self.output_dir, "eval.png"))
        # a run stopped before its first step (during the warm-up) has no metrics yet
        summary = evaluation_summary(read_metrics(self.path)) if os.path.exists(self.path) else None
        if summary:
            tqdm.write(summary)


def truncate_after(path: str, step: int) -> None:
    """Keep the rows of steps <= ``step`` (a resume runs the later ones again; from step 0 it runs everything again,
    the evaluation before the first step included); a last line cut short by a kill is dropped."""
    if not os.path.exists(path):
        return
    rows = read_metrics(path)
    with open(f"{path}.tmp", "w") as f:  # then renamed: a kill now leaves the old file or the new one
        f.writelines(json.dumps(row) + "\n" for row in rows if 0 < step and row["step"] <= step)
    os.replace(f"{path}.tmp", path)


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl. A last line that is not complete JSON (a write that a kill cut short) is
    left out; a bad line before it is an error naming the file and line."""
    with open(path) as f:
        lines = f.read().split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[number:]):
                raise ValueError(f"{path}, line {number}: not a JSON object: {line[:80]!r}") from None
    return rows


def evaluation_summary(rows: list[dict]) -> str | None:
    """One line: the held-out greedy accuracy at the first and the last evaluation of the run, and the change."""
    evaluations = [r for r in rows if "eval/accuracy" in r]
    if not evaluations:
        return None
    first, last = evaluations[0], evaluations[-1]
    return (f"held-out greedy accuracy: {first['eval/accuracy']:.3f} at step {first['step']} -> "
            f"{last['eval/accuracy']:.3f} at step {last['step']} ({last['eval/accuracy'] - first['eval/accuracy']:+.3f}"
            f" over {len(evaluations)} evaluations)")


def plot_rewards(metrics_path: str, png_path: str) -> None:
    """reward_mean per step with a ±std band and a moving average, accuracy, the held-out greedy accuracy at each
    evaluation, and the prompt length (a curriculum's stages) on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    evaluations = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    rows = [r for r in rows if "reward_mean" in r]  # training steps (the evaluation at step 0 has none)
    if not rows:  # e.g. a run stopped during its warm-up
        return
    steps = np.array([r["step"] for r in rows])
    mean = np.array([r["reward_mean"] for r in rows])
    std = np.array([r["reward_std"] for r in rows])
    window = max(1, len(rows) // 10)
    smooth = np.convolve(mean, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(steps, mean - std, mean + std, alpha=0.15, label="±1 std (within batch)")
    ax.plot(steps, mean, alpha=0.5, label="reward mean")
    ax.plot(steps[window - 1:], smooth, linewidth=2, label=f"moving average ({window} steps)")
    if all("accuracy" in r for r in rows):
        ax.plot(steps, [r["accuracy"] for r in rows], linestyle="--", alpha=0.7, label="accuracy")
    if evaluations:
        ax.plot(*zip(*evaluations), marker="o", color="black", label="held-out greedy accuracy")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward")
    ax.set_title("GRPO reward")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if all("prompt_length" in r for r in rows):
        lengths = ax.twinx()
        lengths.plot(steps, [r["prompt_length"] for r in rows], color="grey", linewidth=1, label="prompt tokens")
        lengths.set_ylabel("prompt tokens (mean)")
        more = lengths.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def plot_evaluation(metrics_path: str, png_path: str) -> None:
    """Two panels: the held-out metrics at each evaluation (greedy `eval/accuracy`, sampled `eval/reward_mean`), and
    each reward function's training mean (`reward/<name>`, a moving average) per step. Nothing when the run never
    evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    evaluations = [r for r in rows if "eval/accuracy" in r]
    if not evaluations:
        return
    fig, (held_out, parts) = plt.subplots(1, 2, figsize=(11, 4))
    eval_steps = [r["step"] for r in evaluations]
    held_out.plot(eval_steps, [r["eval/accuracy"] for r in evaluations], marker="o", color="black",
                  label="greedy accuracy (pass@1)")
    held_out.plot(eval_steps, [r["eval/reward_mean"] for r in evaluations], marker="s", linestyle="--",
                  label="sampled reward mean")
    for name in sorted({key for r in evaluations for key in r if key.startswith("eval/reward/")}):
        held_out.plot(eval_steps, [r.get(name, float("nan")) for r in evaluations], marker=".", linewidth=1,
                      alpha=0.7, label=f"greedy {name.removeprefix('eval/reward/')}")
    held_out.set_title(f"held-out evaluation ({len(evaluations)} evaluations)")
    held_out.set_xlabel("GRPO step")
    held_out.grid(alpha=0.3)
    held_out.legend(fontsize=8)
    training = [r for r in rows if "reward_mean" in r]
    names = sorted({key for r in training for key in r if key.startswith("reward/")})
    window = max(1, len(training) // 10)
    for name in names:
        points = [(r["step"], r[name]) for r in training if name in r]
        steps, values = np.array([s for s, _ in points]), np.array([v for _, v in points])
        if len(values) >= window:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            parts.plot(steps[window - 1:], smooth, linewidth=2, label=f"{name} (moving average, {window} steps)")
    parts.set_title("training reward per function")
    parts.set_xlabel("GRPO step")
    parts.grid(alpha=0.3)
    if names:
        parts.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
