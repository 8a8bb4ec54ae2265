"""Experiment trackers behind `--report_to`: TensorBoard and Weights & Biases, through their own APIs. metrics.jsonl
and completions.jsonl are always written (metrics.py); these receive the same scalars and the completions table.

W&B runs offline (`mode="offline"`, synced later with `wandb sync <output_dir>/wandb/offline-run-*`) unless the
environment asks otherwise (`WANDB_MODE`) or an API key is configured and api.wandb.ai answers within 3 s: a run
never waits on a network it does not have. Its run id is kept in `<output_dir>/wandb_run_id`, so `--resume` continues
the same run.
"""
from __future__ import annotations

import os
import socket
import uuid
from typing import Protocol

REPORT_TO = ("tensorboard", "wandb", "jsonl")


class Tracker(Protocol):
    def log(self, metrics: dict, step: int) -> None: ...

    def log_completions(self, step: int, samples: list[dict]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Scalars under `train/<key>` (keys with a group, `eval/...`, `reward/...`, keep it) in output_dir/tensorboard."""

    def __init__(self, output_dir: str, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1)

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)

    def log_completions(self, step: int, samples: list[dict]) -> None:
        pass  # completions.jsonl and W&B hold the table; TensorBoard has no table type

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in output_dir/wandb: the scalars at their step, the options as its config, and a `completions` table
    (step, prompt as the model saw it, completion, rewards) at every --log_completions_steps."""

    def __init__(self, output_dir: str, project: str, config: dict) -> None:
        import wandb

        id_path = os.path.join(output_dir, "wandb_run_id")
        run_id = open(id_path).read().strip() if os.path.exists(id_path) else uuid.uuid4().hex[:12]
        with open(id_path, "w") as f:
            f.write(run_id)
        self.wandb = wandb
        self.run = wandb.init(project=project, name=os.path.basename(os.path.normpath(output_dir)), id=run_id,
                              resume="allow", dir=output_dir, config=config, mode=wandb_mode())

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}, step=step)

    def log_completions(self, step: int, samples: list[dict]) -> None:
        columns = ["step", *samples[0]] if samples else ["step"]
        table = self.wandb.Table(columns=columns, data=[[step, *s.values()] for s in samples])
        self.run.log({"completions": table}, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_mode() -> str:
    """`WANDB_MODE` when set; else "online" when an API key is configured and api.wandb.ai answers, else "offline"."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    import wandb

    if not wandb.login(prompt=False, verify=False):  # no API key configured: nothing to sync to
        return "offline"
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=3).close()
    except OSError:
        return "offline"
    return "online"


def build_trackers(report_to: list[str], output_dir: str, start_step: int, project: str, config: dict) -> list:
    """The trackers `--report_to` names (jsonl is metrics.py's own and always on)."""
    trackers = []
    if "tensorboard" in report_to:
        trackers.append(TensorBoardTracker(output_dir, start_step))
    if "wandb" in report_to:
        trackers.append(WandbTracker(output_dir, project, config))
    return trackers


def check_report_to(report_to: list[str]) -> None:
    """Refuse an unknown tracker, or wandb when the package is missing, naming the option."""
    unknown = [name for name in report_to if name not in REPORT_TO]
    if unknown:
        raise ValueError(f"--report_to {' '.join(unknown)}: choose from {' '.join(REPORT_TO)}")
    if "wandb" in report_to:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ImportError("--report_to wandb needs the wandb package: pip install wandb") from None
