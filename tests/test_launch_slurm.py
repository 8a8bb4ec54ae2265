"""launch/slurm/grpo.sbatch on a real two-node Slurm cluster, and the PreemptionGuard it relies on.

The Slurm tests start Debian's slurmctld, two slurmd and munged (tests/slurm_cluster.py), submit
`sbatch -N 2 --wait launch/slurm/grpo.sbatch --ds_config ds_configs/zero3_cpu.json ...` with the
tiny model, and read the run's metrics.jsonl and checkpoints. Two more jobs are preempted mid-run, one with
`scancel --signal=USR1` (the sbatch lead-time signal), one with `--signal=TERM` (what a time limit or a
preemption sends): each must checkpoint, requeue itself and end with the uninterrupted run's metric values.
In CI (CI=true) they must run; elsewhere they skip, saying why, when Slurm is not installed or this is not root.
"""
from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from pg_deepspeed.grpo.preemption import Preempted, PreemptionGuard, node_rank
from slurm_cluster import SlurmCluster, slurm_cluster, unavailable_reason

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 5
SAVE_STEPS = 4
TRAIN_ARGS = [
    "--ds_config", "ds_configs/zero3_cpu.json", "--model", "tiny-qwen2",
    "--max_steps", str(MAX_STEPS), "--save_steps", str(SAVE_STEPS),
    "--num_generations", "2", "--prompt_length", "32", "--curriculum_start_length", "0", "--max_new_tokens", "8",
    "--no_export",
]
JOB_TIMEOUT_S = 480


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI must run the Slurm tests, but: {reason}")
        pytest.skip(reason)
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


def submit(cluster: SlurmCluster, runs_dir: Path, args: list[str] = TRAIN_ARGS, **env_extra: str
           ) -> tuple[subprocess.Popen, int, Path]:
    """`sbatch -N 2 --wait grpo.sbatch ARGS` from the repository root; returns (sbatch, job id, job dir)."""
    env = dict(cluster.env, GRPO_RUNS_DIR=str(runs_dir), PYTHON=sys.executable, **env_extra)
    sbatch = subprocess.Popen(
        ["sbatch", "-N", "2", "--wait", "--parsable", f"--output={runs_dir}/slurm-%j.out",
         "launch/slurm/grpo.sbatch", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    submitted = sbatch.stdout.readline().split(";")[0].strip()
    if not submitted.isdigit():
        sbatch.wait()
        pytest.fail(f"sbatch did not submit the job: {submitted}{sbatch.stderr.read()}")
    return sbatch, int(submitted), runs_dir / f"grpo-{submitted}"


def wait_job(sbatch: subprocess.Popen, job_dir: Path) -> int:
    try:
        return sbatch.wait(JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        sbatch.kill()
        pytest.fail(f"job did not finish in {JOB_TIMEOUT_S} s\n{logs(job_dir)}")


def metrics(job_dir: Path) -> list[dict]:
    """The complete lines of the run's metrics.jsonl (a line still being written is left out)."""
    path = job_dir / "metrics.jsonl"
    complete = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line) for line in complete if line.strip()]


def checkpoint_steps(job_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in (job_dir / "checkpoints").glob("step_*"))


def logs(job_dir: Path, tail: int = 40) -> str:
    """The last lines of the job's batch and node logs, for failure messages."""
    parts = []
    for path in sorted((job_dir / "logs").glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()[-tail:]
        parts.append(f"--- {path.name}\n" + "\n".join(lines))
    return "\n".join(parts) or f"(no logs under {job_dir})"


def poll(condition, timeout_s: float, what: str, job_dir: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{logs(job_dir)}")


@pytest.fixture(scope="module")
def uninterrupted(cluster: SlurmCluster, runs_dir: Path) -> tuple[int, Path]:
    """One run of TRAIN_ARGS on two nodes, start to finish: (sbatch exit code, job dir)."""
    sbatch, _, job_dir = submit(cluster, runs_dir)
    return wait_job(sbatch, job_dir), job_dir


@pytest.mark.slurm
def test_two_node_job_trains_with_world_size_two_across_node_ranks(uninterrupted: tuple[int, Path]) -> None:
    returncode, job_dir = uninterrupted
    assert returncode == 0, logs(job_dir)
    rows = metrics(job_dir)
    assert [row["step"] for row in rows] == list(range(1, MAX_STEPS + 1)), logs(job_dir)
    assert all(row["world_size"] == 2 for row in rows), rows
    assert all(sorted(row["node_ranks"]) == [0, 1] for row in rows), rows
    assert SAVE_STEPS in checkpoint_steps(job_dir), logs(job_dir)


@pytest.mark.slurm
def test_sp_size_makes_the_two_nodes_one_sequence_parallel_replica(cluster: SlurmCluster, runs_dir: Path) -> None:
    sbatch, _, job_dir = submit(cluster, runs_dir, [*TRAIN_ARGS, "--max_steps", "2"], SP_SIZE="2")
    assert wait_job(sbatch, job_dir) == 0, logs(job_dir)
    assert "--sequence_parallel_size 2" in (job_dir / "logs" / "batch.log").read_text()
    rows = metrics(job_dir)
    assert [row["step"] for row in rows] == [1, 2], logs(job_dir)
    assert all(row["world_size"] == 2 and row["sequence_parallel_size"] == 2 for row in rows), rows


@pytest.mark.slurm
def test_an_sp_size_that_does_not_divide_the_ranks_stops_the_job_naming_it(cluster: SlurmCluster, runs_dir: Path
                                                                            ) -> None:
    sbatch, _, job_dir = submit(cluster, runs_dir, TRAIN_ARGS, SP_SIZE="3")
    assert wait_job(sbatch, job_dir) != 0
    assert "SP_SIZE=3 does not divide the 2 ranks" in (job_dir / "logs" / "batch.log").read_text()


@pytest.mark.slurm
def test_logs_and_outputs_land_in_the_per_job_directory(uninterrupted: tuple[int, Path], runs_dir: Path) -> None:
    _, job_dir = uninterrupted
    assert job_dir.parent == runs_dir and job_dir.name.startswith("grpo-")
    for name in ("logs/batch.log", "logs/node-0.log", "logs/node-1.log", "hostfile", "metrics.jsonl"):
        assert (job_dir / name).is_file(), name


@pytest.mark.slurm
def test_hostfile_names_every_node_with_one_cpu_rank_each(uninterrupted: tuple[int, Path], cluster: SlurmCluster) -> None:
    _, job_dir = uninterrupted
    assert (job_dir / "hostfile").read_text().splitlines() == [f"{node} slots=1" for node in cluster.nodes]


@pytest.mark.slurm
def test_arguments_after_the_script_reach_train_py_unchanged(uninterrupted: tuple[int, Path]) -> None:
    _, job_dir = uninterrupted
    for node in (0, 1):
        log = (job_dir / "logs" / f"node-{node}.log").read_text()
        spawned = re.search(r"spawned with command: (\[.*\])", log)
        assert spawned, f"no train.py command in node-{node}.log"
        argv = ast.literal_eval(spawned.group(1))
        assert argv[2:] == ["launch/train.py", "--local_rank=0", *TRAIN_ARGS, "--output_dir", str(job_dir), "--resume"]


TIMING_KEYS = {"tokens_per_s", "step_time_s", "rollout_time_s", "rollout_tokens_per_s", "rollout_peak_mem_bytes"}


def assert_same_metrics(resumed: list[dict], uninterrupted: list[dict], logs: str) -> None:
    """Each step once, in order, with the uninterrupted run's values (timings aside) to float rounding."""
    assert [row["step"] for row in resumed] == [row["step"] for row in uninterrupted], logs
    for have, want in zip(resumed, uninterrupted):
        for key, value in want.items():
            if key in TIMING_KEYS:
                continue
            if isinstance(value, float):
                assert have[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (want["step"], key)
            else:
                assert have[key] == value, (want["step"], key)


@pytest.mark.slurm
@pytest.mark.parametrize("signal_name", ["USR1", "TERM"])
def test_a_signal_checkpoints_requeues_and_resumes_on_the_uninterrupted_trajectory(
    cluster: SlurmCluster, runs_dir: Path, uninterrupted: tuple[int, Path], signal_name: str
) -> None:
    """USR1 is the sbatch lead-time signal; TERM is what a time limit or a preemption sends (KillWait before
    SIGKILL). Either one, mid-run, gives a checkpoint, a requeue and a resumed run equal to the uninterrupted one."""
    sbatch, job_id, job_dir = submit(cluster, runs_dir)
    poll(lambda: metrics(job_dir), JOB_TIMEOUT_S, "the first training step", job_dir)
    subprocess.run(["scancel", f"--signal={signal_name}", str(job_id)], env=cluster.env, check=True)

    poll(lambda: cluster.job_fields(job_id)["Restarts"] == "1", 120, "the job to requeue itself", job_dir)
    saved_at_preemption = checkpoint_steps(job_dir)
    steps_before_requeue = [row["step"] for row in metrics(job_dir)]
    assert wait_job(sbatch, job_dir) == 0, logs(job_dir)

    stopped_at = steps_before_requeue[-1]
    assert stopped_at < SAVE_STEPS, f"the signal was handled only at step {stopped_at}: nothing to resume"
    assert saved_at_preemption == [stopped_at], logs(job_dir)
    assert cluster.job_fields(job_id)["JobState"] == "COMPLETED"
    assert_same_metrics(metrics(job_dir), metrics(uninterrupted[1]), logs(job_dir))


@pytest.fixture
def usr1_handler_restored():
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_usr1_and_term_request_a_stop_in_a_single_process(usr1_handler_restored, signum) -> None:
    guard = PreemptionGuard()
    assert not guard.stop_requested()
    os.kill(os.getpid(), signum)
    assert guard.stop_requested()


def test_requeue_outside_a_slurm_job_does_nothing(usr1_handler_restored, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("PATH", "")
    assert PreemptionGuard().requeue() is None


@pytest.mark.parametrize("signum, error", [(signal.SIGKILL, ValueError), (0, ValueError), ("USR1", TypeError)])
def test_guard_refuses_a_signal_it_cannot_catch(usr1_handler_restored, signum, error) -> None:
    with pytest.raises(error, match="signum"):
        PreemptionGuard(signum)


def _agree_on_stop(rank: int, init_file: str, answers: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    guard = PreemptionGuard()
    before = guard.stop_requested()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    answers[rank] = (before, guard.stop_requested())
    dist.destroy_process_group()


def test_a_signal_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    with mp.Manager() as manager:
        answers = manager.dict()
        mp.spawn(_agree_on_stop, args=(str(tmp_path / "init"), answers), nprocs=2)
        assert dict(answers) == {0: (False, True), 1: (False, True)}


def _interrupt_forwards(rank: int, init_file: str, answers: dict) -> None:
    """Like a rollout: both ranks call the wrapped model in lockstep; rank 1 is signalled during its 11th call."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    guard = PreemptionGuard()
    calls = []

    def model(i: int) -> int:
        calls.append(i)
        if rank == 1 and i == 11:
            os.kill(os.getpid(), signal.SIGTERM)
        return i

    forward = guard.interruptible(model, every=4)
    try:
        for i in range(1, 100):
            forward(i)
        answers[rank] = ("finished", calls[-1])
    except Preempted:
        answers[rank] = ("preempted", calls[-1])
    dist.destroy_process_group()


def test_interruptible_forwards_stop_every_rank_at_the_same_call(tmp_path: Path) -> None:
    with mp.Manager() as manager:
        answers = manager.dict()
        mp.spawn(_interrupt_forwards, args=(str(tmp_path / "init"), answers), nprocs=2)
        # the flag is polled before calls 4, 8, 12, ...: set during call 11, it stops both ranks before call 12
        assert dict(answers) == {0: ("preempted", 11), 1: ("preempted", 11)}


@pytest.mark.parametrize(
    "variables, expected",
    [
        ({}, 0),
        ({"SLURM_NODEID": "1"}, 1),
        ({"CROSS_RANK": "2", "SLURM_NODEID": "1"}, 2),
        ({"GROUP_RANK": "3", "SLURM_NODEID": "1"}, 3),
    ],
)
def test_node_rank_prefers_the_launcher_over_slurm(monkeypatch: pytest.MonkeyPatch, variables, expected) -> None:
    for name in ("CROSS_RANK", "GROUP_RANK", "SLURM_NODEID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert node_rank() == expected


def test_node_rank_rejects_a_malformed_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CROSS_RANK", raising=False)
    monkeypatch.delenv("GROUP_RANK", raising=False)
    monkeypatch.setenv("SLURM_NODEID", "n1")
    with pytest.raises(ValueError, match="SLURM_NODEID"):
        node_rank()
