"""A real two-node Slurm cluster on this one machine, for the launch tests.

Debian's Slurm 22.05 (`slurmctld`, `slurmd`, `slurm-client`, `munge`) runs one controller and one
`slurmd` per node, here `slurmd -N n1` and `slurmd -N n2` on the same host with their own ports.
Everything (config, munge key and socket, state, spool, logs) lives in one directory; the daemons
are started in the foreground, kept by pid and stopped by pid.

    with slurm_cluster(tmp_dir) as cluster:
        subprocess.run(["sbatch", "--wait", ...], env=cluster.env)
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "sinfo", "squeue", "srun")
DEBIAN_PACKAGES = "slurmctld slurmd slurm-client munge"
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


@dataclass
class SlurmCluster:
    """A running cluster: `env` points Slurm's commands at it (`SLURM_CONF`); `root` holds its files."""

    root: Path
    env: dict[str, str]
    nodes: tuple[str, ...]

    def scontrol(self, *args: str) -> str:
        """Runs `scontrol ARGS` against this cluster and returns its stdout."""
        return _run(["scontrol", *args], self.env)

    def job_fields(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as `{"JobState": "COMPLETED", "Restarts": "1", ...}`."""
        fields = {}
        for token in self.scontrol("show", "job", "--oneliner", str(job_id)).split():
            key, sep, value = token.partition("=")
            if sep:
                fields.setdefault(key, value)
        return fields


def unavailable_reason() -> str | None:
    """Why a Slurm cluster cannot be started here, or None when it can."""
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        return (
            f"Slurm is not installed (missing {', '.join(missing)}); "
            f"as root: apt-get update && apt-get install -y {DEBIAN_PACKAGES}"
        )
    if os.geteuid() != 0:
        return "slurmd must run as root to start job steps, and this process is not root"
    return None


@contextmanager
def slurm_cluster(root: Path, nodes: int = 2, start_timeout_s: float = 60.0) -> Iterator[SlurmCluster]:
    """Starts munged, slurmctld and one slurmd per node under `root`; stops them all, by pid, on exit."""
    if not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes must be a positive int, got {nodes!r}")
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    root = Path(root)
    names = tuple(f"n{i}" for i in range(1, nodes + 1))
    for sub in ("munge", "state", "log", *(f"spool/{n}" for n in names)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"), PATH=_SEARCH_PATH)
    ports = _free_ports(1 + nodes)
    (root / "slurm.conf").write_text(_slurm_conf(root, names, ports))

    with ExitStack() as stack:
        _start(stack, root, "munged", _munged_command(root), env)
        _start(stack, root, "slurmctld", ["slurmctld", "-D", "-c", "-f", str(root / "slurm.conf")], env)
        for name in names:
            _start(stack, root, f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(root / "slurm.conf")], env)
        stack.callback(_cancel_jobs, env)
        _wait_idle(env, names, start_timeout_s, root)
        yield SlurmCluster(root=root, env=env, nodes=names)


def _munged_command(root: Path) -> list[str]:
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    return [
        "munged", "--foreground", "--force",
        f"--socket={root / 'munge' / 'munge.socket.2'}",
        f"--key-file={key}",
        f"--log-file={root / 'log' / 'munged.log'}",
        f"--pid-file={root / 'munge' / 'munged.pid'}",
        f"--seed-file={root / 'munge' / 'munged.seed'}",
    ]


def _slurm_conf(root: Path, names: tuple[str, ...], ports: list[int]) -> str:
    user = _run(["id", "-un"], os.environ).strip()
    cpus = os.cpu_count() or 1
    node_lines = [
        f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={cpus} RealMemory=1024 State=UNKNOWN"
        for name, port in zip(names, ports[1:])
    ]
    return "\n".join([
        "ClusterName=pgtest",
        f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
        f"SlurmctldPort={ports[0]}",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge' / 'munge.socket.2'},cred_expire=10",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}/%n",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'spool'}/%n/slurmd.pid",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log'}/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerParameters=sched_interval=1",
        "SlurmdParameters=config_overrides",
        "JobRequeue=1",
        "MinJobAge=3600",
        "ReturnToService=2",
        "MpiDefault=none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        *node_lines,
        f"PartitionName=debug Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE",
        "",
    ])


def _start(stack: ExitStack, root: Path, label: str, command: list[str], env: dict[str, str]) -> None:
    log = open(root / "log" / f"{label}.stdout", "ab")
    stack.callback(log.close)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    stack.callback(_stop, process)
    time.sleep(0.2)
    if process.poll() is not None:
        raise RuntimeError(f"{label} exited at start with {process.returncode}; see {log.name}")


def _stop(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


def _cancel_jobs(env: dict[str, str], timeout_s: float = 30.0) -> None:
    """Cancels every job still queued or running, so no job step outlives the daemons."""
    subprocess.run(["scancel", "--partition=debug"], env=env, capture_output=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        active = subprocess.run(
            ["squeue", "--noheader", "--states=PENDING,RUNNING,COMPLETING,REQUEUED,SUSPENDED"],
            env=env, capture_output=True, text=True,
        )
        if active.returncode != 0 or not active.stdout.strip():
            return
        time.sleep(0.5)


def _wait_idle(env: dict[str, str], names: tuple[str, ...], timeout_s: float, root: Path) -> None:
    deadline = time.monotonic() + timeout_s
    states = ""
    while time.monotonic() < deadline:
        result = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %t"], env=env, capture_output=True, text=True)
        states = result.stdout.strip()
        idle = {line.split()[0] for line in states.splitlines() if line.split()[1:] == ["idle"]}
        if idle >= set(names):
            return
        time.sleep(0.3)
    raise RuntimeError(f"nodes {names} not idle after {timeout_s} s (sinfo: {states!r}); logs in {root / 'log'}")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    with ExitStack() as stack:
        for s in sockets:
            stack.enter_context(closing(s))
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def _run(command: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout
