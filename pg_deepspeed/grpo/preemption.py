"""Preemption safety: on a signal, stop where every rank agrees, checkpoint, and requeue the Slurm job.

Which signals arrive, and when:
- `SIGUSR1`: `#SBATCH --signal=USR1@<s>`, `<s>` seconds before the time limit, or `scancel --signal=USR1 <job>`;
- `SIGTERM`: the time limit itself (TIMEOUT) and preemption (`PreemptMode=CANCEL` or `REQUEUE`), followed
  `KillWait` seconds later (default 30) by SIGKILL. A plain `scancel <job>` sends it too.

The handler only sets a flag. The trainer polls it (a collective, so all ranks agree) at each step end, after
each supervised warm-up step, and every few model forwards during the rollout (:meth:`PreemptionGuard.interruptible`);
then it saves and calls :meth:`PreemptionGuard.requeue`. The requeued job starts again with the same job id and
resumes from the newest complete checkpoint. A job that was cancelled (`scancel`) is not requeued.
"""
from __future__ import annotations

import os
import signal
import subprocess
from types import FrameType
from typing import Any, Callable

import torch.distributed as dist

from pg_deepspeed.collectives import any_rank

_NODE_RANK_VARIABLES = ("CROSS_RANK", "GROUP_RANK", "SLURM_NODEID")
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Raised on every rank at once by an :meth:`PreemptionGuard.interruptible` call when a stop is requested."""


class PreemptionGuard:
    """Turns any of `signums` into a stop request that every rank sees at the same point.

    Args:
        signums: the signals to catch; default `SIGUSR1` and `SIGTERM` (see the module doc).
    """

    def __init__(self, *signums: int) -> None:
        signums = signums or STOP_SIGNALS
        valid = {int(s) for s in signal.valid_signals()}
        for signum in signums:
            if not isinstance(signum, int) or isinstance(signum, bool):
                raise TypeError(f"signum must be a signal number (int), got {type(signum).__name__}")
            if signum not in valid or signum in (signal.SIGKILL, signal.SIGSTOP):
                raise ValueError(f"signum={signum} is not a signal that a handler can catch")
        self.signums = tuple(signal.Signals(s) for s in signums)
        self._requested = False
        self._calls = 0  # calls through interruptible() wrappers, the same on every rank
        for signum in self.signums:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._requested = True

    def stop_requested(self) -> bool:
        """True when any rank received a signal. Collective: every rank calls it at the same point.

        Under torch.distributed the local flag is all-reduced with MAX, so all ranks agree even though
        Slurm delivers the signal to each process at a slightly different time.
        """
        self._requested = any_rank(self._requested)
        return self._requested

    def interruptible(self, fn: Callable, every: int = 8) -> Callable:
        """`fn` (a model) wrapped so that every `every`-th call through this guard's wrappers first polls the flag
        and raises :class:`Preempted`.

        Collective like :meth:`stop_requested`: valid where all ranks make the same number of calls, as the
        rollout's forwards under ZeRO-3 do (each gathers parameters with a collective). The count runs across
        wrappers, so short rollouts are polled too.
        """
        def call(*args: Any, **kwargs: Any) -> Any:
            self._calls += 1
            if self._calls % every == 0 and self.stop_requested():
                raise Preempted()
            return fn(*args, **kwargs)

        return call

    def requeue(self) -> None:
        """Collective, after every rank saved its checkpoint: barrier, then rank 0 requeues the Slurm job.

        Runs `scontrol requeue $SLURM_JOB_ID`, unless the job was cancelled (`JobState=CANCELLED`: the user
        wants it gone) or is already back in the queue; outside a Slurm job it does nothing.
        """
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.barrier()
        job_id = os.environ.get("SLURM_JOB_ID")
        if job_id is None or (distributed and dist.get_rank() != 0):
            return
        state = job_state(job_id)
        if state in ("CANCELLED", "PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
            print(f"[pg_deepspeed] job {job_id} is {state}: not requeueing", flush=True)
            return
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"`scontrol requeue {job_id}` failed with exit {result.returncode}: {result.stderr.strip()} "
                "(does the job allow requeue? sbatch --requeue, and JobRequeue in slurm.conf)"
            )


def job_state(job_id: str) -> str | None:
    """Slurm's `JobState` of `job_id` (RUNNING, TIMEOUT, CANCELLED, ...), or None when scontrol cannot tell."""
    try:
        result = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True)
    except OSError:
        return None
    for field in result.stdout.split():
        if field.startswith("JobState="):
            return field.removeprefix("JobState=")
    return None


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
