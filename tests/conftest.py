"""Shared fixtures and helpers: the repository root, and a two-rank run through the real ``deepspeed`` launcher."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.launcher import free_port, remove_shm_buffers

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED = Path(sys.executable).with_name("deepspeed")
DEEPSPEED_TIMEOUT_S = 600


def run_deepspeed(script: str, *args: str, num_gpus: int = 2, timeout: float = DEEPSPEED_TIMEOUT_S,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus 2 <script> <args>`` from the repository root; stdout and stderr merged in ``.stdout``.

    The launcher's ranks run on DeepSpeed's CPU accelerator with gloo when there is no GPU. A run that outlives
    ``timeout`` seconds is killed (the launcher and both ranks) and reported as a test failure with its output.
    """
    port = free_port()
    cmd = [str(DEEPSPEED), "--num_gpus", str(num_gpus), "--master_port", str(port), script, *args]
    process = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        stdout, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        stdout, _ = process.communicate()
        raise AssertionError(f"{' '.join(cmd)} ran past {timeout} s; its output ends with:\n{stdout[-4000:]}")
    finally:
        remove_shm_buffers(port)
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, None)


@pytest.fixture(scope="session", autouse=True)
def _shm_comm_op_built_once():
    """DeepSpeed's CPU ranks JIT-build `deepspeed_shm_comm` at their first start. Two ranks building it at once (the
    first launch after an install) aborted a rank twice here ("terminate called without an active exception"); built
    here first, in one process, the ranks only load it."""
    import torch

    if not torch.cuda.is_available():
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        ShareMemCommBuilder().load(verbose=False)
    yield


@pytest.fixture(scope="session", autouse=True)
def _shm_buffers_of_the_session():
    """At the end of the session, the buffers of launches not made through `run_deepspeed` (Slurm, kills)."""
    start = time.time()
    yield
    for path in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        if path.stat().st_mtime >= start:
            path.unlink(missing_ok=True)
