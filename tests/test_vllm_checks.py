"""What `--vllm_tensor_parallel_size` accepts, checked before any work (pg_deepspeed.generation.vllm_engine's
check_tensor_parallel imports nothing from vLLM, so these run without it): the size divides the ranks and the ranks
of a node, and splits the attention heads as vLLM's layers do."""
import pytest
from transformers import AutoConfig

from pg_deepspeed.generation.vllm_engine import check_tensor_parallel


def config(heads: int, kv_heads: int):
    return AutoConfig.for_model("qwen2", num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=32 * heads)


@pytest.mark.parametrize("size, heads, kv_heads", [(1, 9, 3), (2, 4, 2), (4, 8, 2), (8, 8, 2), (3, 9, 3)])
def test_sizes_that_split_the_heads_are_accepted(size, heads, kv_heads):
    """Key/value heads fewer than the size are replicated (8 ranks over 2 key/value heads: 4 copies of each)."""
    check_tensor_parallel(config(heads, kv_heads), size, world_size=16 * size, local_world_size=8 * size)


@pytest.mark.parametrize("size, heads, kv_heads, message", [
    (2, 9, 3, "2 does not divide the model's 9 attention heads"),
    (4, 12, 6, "4 and the model's 6 key/value heads: neither divides the other"),
])
def test_sizes_that_do_not_split_the_heads_are_refused_naming_them(size, heads, kv_heads, message):
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(config(heads, kv_heads), size, world_size=8, local_world_size=4)


def test_a_size_must_divide_the_ranks_and_fit_in_a_node():
    with pytest.raises(ValueError, match="3 does not divide the run's 4 ranks"):
        check_tensor_parallel(config(6, 6), 3, world_size=4, local_world_size=4)
    with pytest.raises(ValueError, match="4 does not divide the run's 2 ranks"):
        check_tensor_parallel(config(4, 4), 4, world_size=2, local_world_size=2)
    with pytest.raises(ValueError, match="4 does not divide the 2 ranks of a node"):
        check_tensor_parallel(config(4, 4), 4, world_size=8, local_world_size=2)
