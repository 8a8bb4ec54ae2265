"""launch/train.py with rank 1's checkpoint writes for one tag made slow, so a test can kill the job mid-save.

    SLOW_SAVE_TAG=step_4 SLOW_SAVE_MARKER=/tmp/m deepspeed --num_gpus 2 tests/dist/slow_save.py [train.py options]

When rank 1 starts writing a file of checkpoint SLOW_SAVE_TAG through DeepSpeed's checkpoint engine, it creates
SLOW_SAVE_MARKER and sleeps 10 minutes before writing: rank 0 has written its own files by then and waits at the
barrier, so a SIGKILL now leaves a torn checkpoint beside the complete older ones. Everything else is the real
trainer, run as `python launch/train.py`.
"""
import os
import runpy
import sys
import time

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

TAG, MARKER = os.environ["SLOW_SAVE_TAG"], os.environ["SLOW_SAVE_MARKER"]
_save = TorchCheckpointEngine.save


def slow_save(self, state_dict, path):
    if os.environ.get("RANK") == "1" and os.path.basename(os.path.dirname(path)) == TAG:
        with open(MARKER, "w") as file:
            file.write(path)
        time.sleep(600)
    return _save(self, state_dict, path)


TorchCheckpointEngine.save = slow_save
script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "launch", "train.py")
sys.argv = [script, *sys.argv[1:]]
runpy.run_path(script, run_name="__main__")
