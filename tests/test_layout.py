"""PrefixGroupLayout: packing order, position ids and predecessors, the attention plan against the standard forward's
mask, round trips through `pack_completions`, and refusals of malformed input."""
import pytest
import torch

from pg_deepspeed import PrefixGroupLayout
from pg_deepspeed.layouts.packing import pack_completions


def member_rows(prefix: list[int], suffix: list[list[int]]) -> list[list[int]]:
    """Each member's sequence `[prompt ; completion]` as packed indices, from the lengths alone: groups packed
    `[prefix_g | suffix_g1 | ... | suffix_gG]` one after another."""
    rows, at = [], 0
    for p, members in zip(prefix, suffix):
        prompt, at = list(range(at, at + p)), at + p
        for s in members:
            rows.append(prompt + list(range(at, at + s)))
            at += s
    return rows


def standard_mask(prefix: list[int], suffix: list[list[int]]) -> torch.Tensor:
    """[T, T] bool, the standard forward's attention: query i sees key j when j is at or before i on a member's
    sequence (a prompt token sees its prompt causally, a completion token its whole prompt and its own past)."""
    rows = member_rows(prefix, suffix)
    T = sum(prefix) + sum(map(sum, suffix))
    mask = torch.zeros(T, T, dtype=torch.bool)
    for row in rows:
        for a, i in enumerate(row):
            mask[i, row[: a + 1]] = True
    return mask


def pairs_the_plan_computes(layout: PrefixGroupLayout) -> torch.Tensor:
    """[T, T] how many times the plan's passes compute each (query, key) pair: causally within each run of the
    causal pass, and every query of a cross-pass sequence against every key of it."""
    plan, T = layout.plan, layout.num_tokens
    count = torch.zeros(T, T, dtype=torch.long)
    runs = plan.cu_causal.tolist()
    for a, b in zip(runs[:-1], runs[1:]):
        count[a:b, a:b] += torch.ones(b - a, b - a, dtype=torch.long).tril()
    cu_q, cu_k = plan.cu_cross_q.tolist(), plan.cu_cross_k.tolist()
    for r in range(len(cu_q) - 1):
        q, k = plan.cross_q[cu_q[r]: cu_q[r + 1]], plan.cross_k[cu_k[r]: cu_k[r + 1]]
        count[q[:, None], k[None, :]] += 1
    return count


def random_lengths(g: torch.Generator) -> tuple[list[int], list[list[int]]]:
    """1-4 groups, prompts of 1-9 tokens, 1-4 completions of 1-6 tokens each (one-member groups included)."""
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    groups = rand(1, 4)
    return [rand(1, 9) for _ in range(groups)], [[rand(1, 6) for _ in range(rand(1, 4))] for _ in range(groups)]


def test_hand_made_case_packs_each_prompt_once_before_its_completions():
    layout = PrefixGroupLayout.from_lengths([3, 2], [[2, 1], [3]])
    # group 0: prefix 0 1 2 | suffix 3 4 | suffix 3 ; group 1: prefix 0 1 | suffix 2 3 4
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4]
    assert layout.num_tokens == 11
    assert layout.cu_seqlens.tolist() == [0, 3, 5, 6, 8, 11]
    assert layout.suffix_index.tolist() == [3, 4, 5, 8, 9, 10]
    assert layout.cu_groups.tolist() == [0, 6, 11]
    assert layout.segments() == ([-1, 0, 0, -1, 3], [3, 2, 1, 2, 3])
    assert layout.prefix_tokens_saved == 3


def test_hand_made_case_predecessors_are_the_previous_token_of_each_sequence():
    """A completion's first token is predicted by its prompt's last token, not by the previous member's last."""
    layout = PrefixGroupLayout.from_lengths([3, 2], [[2, 1], [3]])
    assert layout.predecessor.tolist() == [-1, 0, 1, 2, 3, 2, -1, 6, 7, 8, 9]


def test_positions_and_predecessors_follow_each_members_sequence_in_random_layouts():
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        prefix, suffix = random_lengths(g)
        layout = PrefixGroupLayout.from_lengths(prefix, suffix)
        for row in member_rows(prefix, suffix):
            assert layout.position_ids[row].tolist() == list(range(len(row)))
            assert layout.predecessor[row].tolist() == [-1, *row[:-1]]


def test_the_attention_plan_computes_each_pair_of_the_standard_forward_once_and_no_other():
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        prefix, suffix = random_lengths(g)
        layout = PrefixGroupLayout.from_lengths(prefix, suffix)
        assert torch.equal(pairs_the_plan_computes(layout), standard_mask(prefix, suffix).long()), (prefix, suffix)


def test_pack_then_unpack_round_trip_with_left_padded_prompts():
    prompt_mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    prompt_ids = torch.tensor([[-1, 10, 11, 12], [-1, -1, 20, 21]])
    completion_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    completion_ids = torch.tensor([[30, 31, -1], [40, -1, -1], [50, 51, 52]])
    layout = PrefixGroupLayout.from_masks(prompt_mask, completion_mask, [2, 1])
    packed = layout.pack(prompt_ids, completion_ids)
    assert packed.tolist() == [10, 11, 12, 30, 31, 40, 20, 21, 50, 51, 52]
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4]
    packing = pack_completions(prompt_ids, prompt_mask, completion_ids, completion_mask, [2, 1])
    assert torch.equal(packing.ids, packed)
    assert torch.equal(packing.unpack(packed[packing.targets]), completion_ids * completion_mask)


def test_from_masks_right_padded_equals_left_padded():
    left = PrefixGroupLayout.from_masks(torch.tensor([[0, 0, 1, 1, 1]]), torch.ones(2, 3), 2)
    right = PrefixGroupLayout.from_masks(torch.tensor([[1, 1, 1, 0, 0]]), torch.ones(2, 3), 2)
    assert torch.equal(left.position_ids, right.position_ids)
    assert left.prompt_start.tolist() == [2] and right.prompt_start.tolist() == [0]
    ids = torch.tensor([[7, 8, 1, 2, 3]])
    assert left.pack(ids, torch.zeros(2, 3, dtype=torch.long))[:3].tolist() == [1, 2, 3]
    assert right.pack(ids, torch.zeros(2, 3, dtype=torch.long))[:3].tolist() == [7, 8, 1]


def test_random_round_trip_keeps_every_prompt_and_completion_token():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        B = int(torch.randint(1, 5, (1,), generator=g))
        sizes = torch.randint(1, 6, (B,), generator=g).tolist()
        N, Lp, Lc = sum(sizes), 12, 9
        p_len = torch.randint(1, Lp + 1, (B,), generator=g)
        c_len = torch.randint(1, Lc + 1, (N,), generator=g)
        prompt_mask = (torch.arange(Lp) >= Lp - p_len[:, None]).long()
        completion_mask = (torch.arange(Lc) < c_len[:, None]).long()
        prompt_ids = torch.randint(0, 1000, (B, Lp), generator=g)
        completion_ids = torch.randint(0, 1000, (N, Lc), generator=g)
        packing = pack_completions(prompt_ids, prompt_mask, completion_ids, completion_mask, sizes)
        assert packing.ids.shape == (int(p_len.sum() + c_len.sum()),)
        starts = packing.layout.cu_groups.tolist()
        for b in range(B):  # each prompt's valid tokens once, at the head of its group
            assert packing.ids[starts[b]: starts[b] + p_len[b]].tolist() == prompt_ids[b, Lp - p_len[b]:].tolist()
        assert torch.equal(packing.unpack(packing.ids[packing.targets]), completion_ids * completion_mask)


def test_unpack_hands_each_completion_token_its_own_gradient():
    """completion_logprobs returns `unpack(logps)`: the loss's gradient at (member, column) reaches that token only."""
    completion_mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]])
    prompts, completions = torch.ones(2, 2, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long)
    packing = pack_completions(prompts, torch.ones(2, 2), completions, completion_mask, [1, 2])
    x = torch.zeros(packing.targets.numel(), requires_grad=True)
    weights = torch.arange(9.0).view(3, 3)
    (packing.unpack(x) * weights).sum().backward()
    assert x.grad.tolist() == [0.0, 3.0, 4.0, 5.0, 6.0, 7.0]


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
