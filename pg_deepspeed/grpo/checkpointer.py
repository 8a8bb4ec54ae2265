"""When and what the trainer saves: resume from the newest complete checkpoint, save at most once per point, and stop
on a preemption request with a checkpoint and a requeue."""
from __future__ import annotations

from dataclasses import dataclass

from pg_deepspeed.distributed.checkpoint import load_checkpoint, save_checkpoint
from pg_deepspeed.grpo.args import TrainArguments
from pg_deepspeed.grpo.nonfinite import NonFiniteStop, weights_finite
from pg_deepspeed.grpo.preemption import PreemptionGuard


@dataclass
class ResumePoint:
    step: int = 0      # GRPO steps done
    sft_done: int = 0  # warm-up steps done


def describe(step: int, sft_step: int | None) -> str:
    return f"step {step}" if sft_step is None else f"warm-up step {sft_step}"


class Checkpointer:
    """Saves `policy` under train.output_dir/checkpoints. A checkpoint is named by (step, sft_step): sft_step is the
    warm-up steps done when saved during the warm-up, None after it. Collective: every rank calls every method."""

    def __init__(self, policy, train: TrainArguments, rank: int, guard: PreemptionGuard) -> None:
        self.policy, self.train, self.rank, self.guard = policy, train, rank, guard
        self.saved: tuple[int, int | None] | None = None  # the newest complete checkpoint

    def resume(self) -> ResumePoint:
        """Where --resume continues (the start without it); loads the policy's weights, optimizer and RNG states."""
        state = load_checkpoint(self.policy, self.train.output_dir) if self.train.resume else None
        if state is None:
            return ResumePoint()
        self.saved = (state["step"], state.get("sft_step"))
        if self.rank == 0:
            print(f"[pg_deepspeed] resumed from {describe(*self.saved)} in {self.train.output_dir}", flush=True)
        sft_done = self.train.sft_warmup_steps if self.saved[1] is None else self.saved[1]
        return ResumePoint(step=state["step"], sft_done=sft_done)

    def save(self, step: int, sft_step: int | None = None, rng_state: dict | None = None) -> None:
        """Save unless this point is the newest complete checkpoint already (a resume with nothing to do)."""
        if self.saved != (step, sft_step):
            if not weights_finite(self.policy):
                raise NonFiniteStop(f"refusing to save {describe(step, sft_step)}: the policy holds NaN or inf weights")
            save_checkpoint(self.policy, self.train.output_dir, step, {"data_position": step}, sft_step=sft_step,
                            total_limit=self.train.save_total_limit, rng_state=rng_state)
            self.saved = (step, sft_step)

    def after_step(self, step: int) -> None:
        """Every --save_steps GRPO steps."""
        if self.train.save_steps and step % self.train.save_steps == 0:
            self.save(step)

    def stop(self, step: int, sft_step: int | None = None, rng_state: dict | None = None, during: str = "") -> None:
        """A stop was requested: save this point, then requeue the job (see preemption.py)."""
        self.save(step, sft_step, rng_state)
        if self.rank == 0:
            print(f"[pg_deepspeed] stop requested{during}: checkpoint at {describe(step, sft_step)}, requeueing",
                  flush=True)
        self.guard.requeue()
