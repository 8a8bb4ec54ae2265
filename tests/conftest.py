"""Shared fixtures and helpers: the repository root, and a two-rank run through the real ``deepspeed`` launcher."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED = Path(sys.executable).with_name("deepspeed")
DEEPSPEED_TIMEOUT_S = 600


def free_port() -> int:
    """A TCP port nothing listens on now, so parallel launcher runs do not share the default 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def remove_shm_buffers(port: int | str = "*") -> None:
    """Delete the shared-memory all-reduce buffers DeepSpeed's CPU ranks leave in /dev/shm (deepspeed 0.19.8 never
    unlinks them: about 66 MB per rank and master port, so a session of launches on free ports fills /dev/shm,
    which is RAM)."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def _shm_buffers_of_the_session():
    """At the end of the session, the buffers of launches not made through `run_deepspeed` (Slurm, kills)."""
    start = time.time()
    yield
    for path in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        if path.stat().st_mtime >= start:
            path.unlink(missing_ok=True)
