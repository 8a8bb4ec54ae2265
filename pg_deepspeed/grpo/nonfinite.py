"""The non-finite guard: an optimizer step whose loss or gradient norm is NaN or inf on any rank is skipped on every
rank, said, and counted; `--max_nonfinite_steps` consecutive skips stop the run.

The skip itself is DeepSpeed's (read from deepspeed 0.19.8): its ZeRO optimizers (stages 1-3) compute the global
gradient norm over all ranks and, when it is not finite, drop the accumulated gradients and skip the step and the LR
scheduler (`engine.was_step_applied()` is then False). A NaN loss makes NaN gradients, so it is skipped the same way.
Every rank must still run its backward (a ZeRO-3 backward is a collective), so the guard never skips a backward: it
checks after each optimizer step. Where an engine applied a step whose loss was not finite (a config without ZeRO
and without that check), the weights are already poisoned: the run stops at once, before any checkpoint.
"""
from __future__ import annotations

import math

import torch

from pg_deepspeed.collectives import any_rank


class NonFiniteStop(RuntimeError):
    """Too many consecutive optimizer steps were non-finite, or a non-finite step was applied."""


class NonFiniteGuard:
    """Counts consecutive skipped optimizer steps across the run. Collective: every rank calls `after_step`."""

    def __init__(self, max_consecutive: int, fp16: bool = False) -> None:
        self.max_consecutive = max_consecutive
        self.fp16 = fp16  # fp16's dynamic loss scaler skips overflowing steps by design: only a NaN loss counts there
        self.consecutive = 0

    def after_step(self, engine, loss_finite: bool, where: str) -> bool:
        """After an optimizer step (`engine.step()` at an accumulation boundary) whose micro-batch losses were all
        finite on this rank or not: True when the step was skipped for a non-finite loss or gradient norm on some
        rank. Raises NonFiniteStop past the limit, or when such a step was applied."""
        norm = engine.get_global_grad_norm()
        bad_loss = any_rank(not loss_finite)
        bad_norm = any_rank(not self.fp16 and norm is not None and not math.isfinite(float(norm)))
        if not (bad_loss or bad_norm):
            self.consecutive = 0
            return False
        if engine.was_step_applied():
            raise NonFiniteStop(f"{where}: a non-finite loss or gradient norm reached an optimizer step that was "
                                "applied (this DeepSpeed config does not skip non-finite steps; use ZeRO stage 1-3): "
                                "stopping before any checkpoint")
        self.consecutive += 1
        if engine.global_rank == 0:
            what = "loss" if bad_loss else f"gradient norm ({norm})"
            print(f"[pg_deepspeed] {where}: non-finite {what} on some rank; optimizer step skipped on every rank "
                  f"({self.consecutive} in a row)", flush=True)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteStop(f"{where}: {self.consecutive} consecutive optimizer steps had a non-finite loss or "
                                f"gradient norm (--max_nonfinite_steps {self.max_consecutive}): stopping; the last "
                                "checkpoint holds the last finite weights")
        return True


def weights_finite(engine) -> bool:
    """Whether every parameter on every rank is finite (each rank checks its ZeRO-3 partition, or its full copy).
    Collective."""
    local = all(bool(torch.isfinite(getattr(p, "ds_tensor", p.data)).all()) for p in engine.module.parameters())
    return not any_rank(not local)
