"""PrefixGroupLayout: packing order, position ids, round trips, and refusals of malformed input."""
import pytest
import torch

from pg_deepspeed import PrefixGroupLayout


def test_position_ids_hand_made_case():
    layout = PrefixGroupLayout.from_lengths([3, 2], [[2, 1], [3]])
    # group 0: prefix 0 1 2 | suffix 3 4 | suffix 3 ; group 1: prefix 0 1 | suffix 2 3 4
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4]
    assert layout.num_tokens == 11
    assert layout.cu_seqlens.tolist() == [0, 3, 5, 6, 8, 11]
    assert layout.prefix_index.tolist() == [0, 1, 2, 6, 7]
    assert layout.suffix_index.tolist() == [3, 4, 5, 8, 9, 10]
    assert layout.cu_prefix.tolist() == [0, 3, 5] and layout.cu_suffix.tolist() == [0, 3, 6]
    assert layout.cu_groups.tolist() == [0, 6, 11] and not layout.single_member
    assert layout.prefix_tokens_saved == 3


def test_pack_then_unpack_round_trip_with_left_padded_prompts():
    prompt_mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    prompt_ids = torch.tensor([[-1, 10, 11, 12], [-1, -1, 20, 21]])
    completion_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    completion_ids = torch.tensor([[30, 31, -1], [40, -1, -1], [50, 51, 52]])
    layout = PrefixGroupLayout.from_masks(prompt_mask, completion_mask, [2, 1])
    packed = layout.pack(prompt_ids, completion_ids)
    assert packed.tolist() == [10, 11, 12, 30, 31, 40, 20, 21, 50, 51, 52]
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4]
    assert torch.equal(layout.unpack_completions(packed), completion_ids * completion_mask)


def test_from_masks_right_padded_equals_left_padded():
    left = PrefixGroupLayout.from_masks(torch.tensor([[0, 0, 1, 1, 1]]), torch.ones(2, 3), 2)
    right = PrefixGroupLayout.from_masks(torch.tensor([[1, 1, 1, 0, 0]]), torch.ones(2, 3), 2)
    assert torch.equal(left.position_ids, right.position_ids)
    assert left.prompt_start.tolist() == [2] and right.prompt_start.tolist() == [0]
    ids = torch.tensor([[7, 8, 1, 2, 3]])
    assert left.pack(ids, torch.zeros(2, 3, dtype=torch.long))[:3].tolist() == [1, 2, 3]
    assert right.pack(ids, torch.zeros(2, 3, dtype=torch.long))[:3].tolist() == [7, 8, 1]


def test_random_round_trip_keeps_every_completion_token():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        B = int(torch.randint(1, 5, (1,), generator=g))
        sizes = torch.randint(1, 6, (B,), generator=g).tolist()
        N, Lp, Lc = sum(sizes), 12, 9
        p_len = torch.randint(1, Lp + 1, (B,), generator=g)
        c_len = torch.randint(1, Lc + 1, (N,), generator=g)
        prompt_mask = (torch.arange(Lp) >= Lp - p_len[:, None]).long()
        completion_mask = (torch.arange(Lc) < c_len[:, None]).long()
        completion = torch.randn(N, Lc, 3, generator=g)
        layout = PrefixGroupLayout.from_masks(prompt_mask, completion_mask, sizes)
        packed = layout.pack(torch.randn(B, Lp, 3, generator=g), completion)
        assert packed.shape == (int(p_len.sum() + c_len.sum()), 3)
        assert torch.equal(layout.unpack_completions(packed), completion * completion_mask[..., None])


def test_unpack_is_differentiable():
    layout = PrefixGroupLayout.from_lengths([2], [[1, 2]])
    x = torch.randn(5, requires_grad=True)
    layout.unpack_completions(x).sum().backward()
    assert x.grad.tolist() == [0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    "prompt_mask, completion_mask, group_size, message",
    [
        ([[1, 1]], [[1], [1]], 3, r"group sizes add up to 3 but there are 2 completion_mask rows"),
        ([[1, 1], [1, 1]], [[1], [1]], [1], r"group_size lists 1 groups but there are 2 prompt_mask rows"),
        ([[0, 0]], [[1], [1]], 2, r"prompt_mask row 0 \(group 0\) is empty"),
        ([[1, 0, 1]], [[1], [1]], 2, r"prompt_mask row 0 \(group 0\) has holes"),
        ([[1, 1]], [[1, 0, 1], [1, 0, 0]], 2, r"completion_mask row 0 has holes"),
        ([[1, 1]], [[0, 1], [1, 0]], 2, r"completion_mask row 0 has holes or is not right-padded"),
        ([[1, 1]], torch.ones(2, 0), 2, r"completion_mask has no columns"),
        ([[1, 1]], [[1], [1]], 0, r"group_size must be >= 1"),
    ],
)
def test_from_masks_refuses_malformed_masks(prompt_mask, completion_mask, group_size, message):
    with pytest.raises(ValueError, match=message):
        PrefixGroupLayout.from_masks(torch.tensor(prompt_mask), torch.as_tensor(completion_mask), group_size)


@pytest.mark.parametrize(
    "prefix, suffix, message",
    [
        ([3, 0], [[1], [1]], r"group 1: empty prefix"),
        ([3], [[1, 0]], r"group 0, member 1: empty suffix"),
        ([3], [[]], r"group 0: no suffixes"),
        ([3, 4], [[1]], r"prefix_lens has 2 groups but suffix_lens has 1"),
    ],
)
def test_from_lengths_refuses_bad_lengths(prefix, suffix, message):
    with pytest.raises(ValueError, match=message):
        PrefixGroupLayout.from_lengths(prefix, suffix)


def test_pack_refuses_wrong_row_counts():
    layout = PrefixGroupLayout.from_lengths([2], [[1, 1]])
    with pytest.raises(ValueError, match=r"completion_ids has 3 rows but the layout has 2 members"):
        layout.pack(torch.zeros(1, 2), torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"prompt_ids has 2 rows but the layout has 1 groups"):
        layout.pack(torch.zeros(2, 2), torch.zeros(2, 1))


def test_an_all_zero_completion_row_spans_the_width_and_is_computed():
    """TRL's mask_truncated_completions: the tokens exist, the loss mask is zero; the layout still packs them."""
    completion_mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    layout = PrefixGroupLayout.from_masks(torch.tensor([[0, 1, 1]]), completion_mask, 3)
    assert layout.suffix_lens.tolist() == [2, 4, 4]
    assert layout.num_tokens == 2 + 2 + 4 + 4
    completion_ids = torch.arange(12).view(3, 4)
    packed = layout.pack(torch.tensor([[99, 7, 8]]), completion_ids)
    assert packed.tolist() == [7, 8, 0, 1, 4, 5, 6, 7, 8, 9, 10, 11]
