"""Shared fixtures and helpers: the repository root, and a two-rank run through the real ``deepspeed`` launcher."""
import os
import socket
import subprocess
import sys
from pathlib import Path

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
    cmd = [str(DEEPSPEED), "--num_gpus", str(num_gpus), "--master_port", str(free_port()), script, *args]
    process = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        stdout, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        stdout, _ = process.communicate()
        raise AssertionError(f"{' '.join(cmd)} ran past {timeout} s; its output ends with:\n{stdout[-4000:]}")
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, None)
