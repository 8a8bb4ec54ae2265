"""launch/train.py with SIGUSR1 sent to rank 1 from inside the supervised warm-up or the rollout, so a test can
check where a stop is honoured.

    SIGNAL_DURING=sft:2 deepspeed --num_gpus 2 tests/dist/signal_during.py [train.py options]      # warm-up step 2
    SIGNAL_DURING=rollout:3 deepspeed --num_gpus 2 tests/dist/signal_during.py [train.py options]  # step 3's rollout

Rank 1 signals itself at the start of the n-th warm-up forward (`steps.completion_logprobs`, one per warm-up step with
gradient_accumulation_steps 1) or of the n-th rollout (`generate`, before its first model forward). Everything
else is the real trainer, run as `python launch/train.py`.
"""
import os
import runpy
import signal
import sys

from pg_deepspeed.grpo import steps

WHERE, _, NUMBER = os.environ["SIGNAL_DURING"].partition(":")
TARGET = {"sft": "completion_logprobs", "rollout": "generate"}[WHERE]
original = getattr(steps, TARGET)
calls = 0


def signalling(*args, **kwargs):
    global calls
    calls += 1
    if os.environ.get("RANK") == "1" and calls == int(NUMBER):
        os.kill(os.getpid(), signal.SIGUSR1)
    return original(*args, **kwargs)


setattr(steps, TARGET, signalling)
script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "launch", "train.py")
sys.argv = [script, *sys.argv[1:]]
runpy.run_path(script, run_name="__main__")
