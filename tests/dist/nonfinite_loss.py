"""launch/train.py with rank 1's GRPO loss made NaN at chosen steps, so a test can check the non-finite guard.

    NAN_STEPS=2 deepspeed --num_gpus 2 tests/dist/nonfinite_loss.py [train.py options]        # rank 1, step 2
    NAN_STEPS=2,3,4 deepspeed --num_gpus 2 tests/dist/nonfinite_loss.py [train.py options]    # three in a row

Rank 1 multiplies the loss that `steps.policy_loss` returns by NaN at the listed GRPO steps (one policy_loss call
per step: gradient_accumulation_steps and num_iterations 1), so its backward makes NaN gradients, as a bf16
overflow would. Everything else is the real trainer, run as `python launch/train.py`.
"""
import os
import runpy
import sys

from pg_deepspeed.grpo import steps

NAN_STEPS = {int(s) for s in os.environ["NAN_STEPS"].split(",")}
original = steps.policy_loss
calls = 0


def poisoned(*args, **kwargs):
    global calls
    calls += 1
    loss, stats = original(*args, **kwargs)
    if os.environ.get("RANK") == "1" and calls in NAN_STEPS:
        loss = loss * float("nan")
    return loss, stats


steps.policy_loss = poisoned
script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "launch", "train.py")
sys.argv = [script, *sys.argv[1:]]
runpy.run_path(script, run_name="__main__")
