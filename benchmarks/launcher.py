"""Local launches of the DeepSpeed launcher, for the benchmarks and the tests: a free master port, and the
shared-memory buffers DeepSpeed's CPU ranks leave behind."""
from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port nothing listens on now, so parallel launcher runs do not share the default 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def remove_shm_buffers(port: int | str = "*") -> None:
    """Delete the shared-memory all-reduce buffers DeepSpeed's CPU ranks leave in /dev/shm (deepspeed 0.19.8 never
    unlinks them: about 66 MB per rank and master port, so a session of launches on free ports fills /dev/shm,
    which is RAM)."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)
