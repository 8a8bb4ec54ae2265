"""Prints the first TCP port from START upward that this machine can listen on.

    python launch/slurm/free_port.py 20042     # -> 20042, or 20043 if that one is taken, ...

grpo.sbatch derives START from the job id, so a requeued job asks for the same port again.
"""
from __future__ import annotations

import socket
import sys

TRIES = 200


def first_free_port(start: int, tries: int = TRIES) -> int:
    """The first port in [start, start + tries) that binds on all interfaces."""
    if not 1024 <= start <= 65535 - tries:
        raise ValueError(f"start port {start} is outside [1024, {65535 - tries}]")
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{start}, {start + tries})")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: free_port.py START")
    print(first_free_port(int(sys.argv[1])))
