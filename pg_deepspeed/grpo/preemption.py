"""Preemption safety: stop at a step boundary on a signal, then requeue the Slurm job.

Slurm sends `SIGUSR1` some seconds before a job's time limit (`#SBATCH --signal=USR1@<s>`), or
whenever an operator runs `scancel --signal=USR1 <job>`. The handler only sets a flag; the trainer
polls it at each step boundary, where all ranks agree on it, and does

    if guard.stop_requested():
        save_checkpoint(...)
        guard.requeue()
        sys.exit(0)

The requeued job starts again with the same job id and resumes from the newest checkpoint.
"""
from __future__ import annotations

import os
import signal
import subprocess
from types import FrameType

import torch.distributed as dist

from .collective import any_rank

_NODE_RANK_VARIABLES = ("CROSS_RANK", "GROUP_RANK", "SLURM_NODEID")


class PreemptionGuard:
    """Turns a signal into a stop request that every rank sees at the same step boundary.

    Args:
        signum: the signal to catch (`SIGUSR1`, as Slurm's `--signal=USR1@<s>` sends).
    """

    def __init__(self, signum: int = signal.SIGUSR1) -> None:
        if not isinstance(signum, int) or isinstance(signum, bool):
            raise TypeError(f"signum must be a signal number (int), got {type(signum).__name__}")
        valid = {int(s) for s in signal.valid_signals()}
        if signum not in valid or signum in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"signum={signum} is not a signal that a handler can catch")
        self.signum = signal.Signals(signum)
        self._requested = False
        signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._requested = True

    def stop_requested(self) -> bool:
        """True when any rank received the signal. Collective: every rank calls it at each step boundary.

        Under torch.distributed the local flag is all-reduced with MAX, so all ranks agree even though
        Slurm delivers the signal to each process at a slightly different time.
        """
        self._requested = any_rank(self._requested)
        return self._requested

    def requeue(self) -> None:
        """Collective, after every rank saved its checkpoint: barrier, then rank 0 requeues the Slurm job.

        Runs `scontrol requeue $SLURM_JOB_ID`; outside a Slurm job it does nothing. Slurm then ends
        this run and starts the job again, with the same id, once its credentials expire.
        """
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.barrier()
        job_id = os.environ.get("SLURM_JOB_ID")
        if job_id is None or (distributed and dist.get_rank() != 0):
            return
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"`scontrol requeue {job_id}` failed with exit {result.returncode}: {result.stderr.strip()} "
                "(does the job allow requeue? sbatch --requeue, and JobRequeue in slurm.conf)"
            )


def node_rank() -> int:
    """This process's node rank: `CROSS_RANK` (DeepSpeed's launcher), `GROUP_RANK` (torchrun),
    `SLURM_NODEID` (a Slurm job step), else 0 on a single machine."""
    for name in _NODE_RANK_VARIABLES:
        value = os.environ.get(name)
        if value is None:
            continue
        try:
            rank = int(value)
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} is not an integer node rank") from None
        if rank < 0:
            raise ValueError(f"environment variable {name}={value!r} is a negative node rank")
        return rank
    return 0

