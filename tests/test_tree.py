"""PrefixTreeLayout: shared segments at any depth against every path computed alone, outputs and gradients."""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg_deepspeed import PrefixGroupLayout, PrefixTreeLayout, patch_model, prefix_grouper_attention
from reference import TINY_FAMILIES, dense_causal_attention, tiny_causal_lm, tree_path_attention


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error, absolute below norm 1 (a one-token tree has dq = 0 exactly)."""
    return ((a - b).norm() / b.norm().clamp(min=1.0)).item()


@st.composite
def forests(draw, max_depth=4):
    """(parents, lengths): several roots, depth up to max_depth, random branching, single-child chains,
    segments listed in an order that keeps parents first but interleaves subtrees."""
    parents, lengths, depth = [], [], []
    for _ in range(draw(st.integers(1, 12))):
        candidates = [s for s, d in enumerate(depth) if d < max_depth - 1]
        parent = draw(st.sampled_from([-1, *candidates])) if candidates else -1
        parents.append(parent)
        depth.append(0 if parent < 0 else depth[parent] + 1)
        lengths.append(draw(st.integers(1, 40)))
    return parents, lengths


def run_both(parents, lengths, hq, hkv, d, dtype, seed):
    torch.manual_seed(seed)
    layout = PrefixTreeLayout.from_parents(parents, lengths)
    T = layout.num_tokens
    q = torch.randn(T, hq, d, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(T, hkv, d, dtype=dtype, requires_grad=True) for _ in range(2))
    ours = prefix_grouper_attention(q, k, v, layout, backend="cpu")
    dout = torch.randn_like(ours)
    ref = tree_path_attention(q.double(), k.double(), v.double(), parents, lengths)
    return ((ours, *torch.autograd.grad(ours, (q, k, v), dout)),
            (ref, *torch.autograd.grad(ref, (q, k, v), dout.double())))


heads = st.sampled_from([(4, 4), (4, 2), (4, 1), (6, 2)])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(forest=forests(), heads=heads, seed=st.integers(0, 2**16))
def test_random_forests_match_every_path_alone_in_float64_within_1e_10(forest, heads, seed):
    ours, ref = run_both(*forest, *heads, 32, torch.float64, seed)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert rel_err(a, b) <= 1e-10, name


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(forest=forests(), heads=heads, seed=st.integers(0, 2**16))
def test_random_forests_match_every_path_alone_in_float32_within_1e_5(forest, heads, seed):
    ours, ref = run_both(*forest, *heads, 64, torch.float32, seed)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert rel_err(a.double(), b) <= 1e-5, name


def test_a_deep_chain_and_a_wide_fan_are_exact():
    """Depth 4 with single-child chains (fused into one causal run) next to a node with many children."""
    parents, lengths = [-1, 0, 1, 2, 0, 0, 0, 5, -1], [30, 7, 1, 12, 3, 9, 2, 4, 11]
    ours, ref = run_both(parents, lengths, 4, 2, 32, torch.float64, 0)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert rel_err(a, b) <= 1e-10, name


TWO_LEVEL_BATCH = ([50, 8, 20], [[5, 1, 17], [9], [40, 3]])


def depth_one_forest(prefix, suffix):
    """(parents, lengths) of a two-level batch written out by hand: each prompt a root, its completions children."""
    parents, lengths = [], []
    for p, members in zip(prefix, suffix):
        root = len(parents)
        parents += [-1] + [root] * len(members)
        lengths += [p, *members]
    return parents, lengths


def test_a_two_level_layout_is_the_depth_one_tree_of_its_prompts_and_completions():
    """Its segments are that forest, and its positions and predecessors are the ones the tree layout gives it."""
    two_level = PrefixGroupLayout.from_lengths(*TWO_LEVEL_BATCH)
    parents, lengths = depth_one_forest(*TWO_LEVEL_BATCH)
    tree = PrefixTreeLayout.from_parents(parents, lengths)
    assert two_level.segments() == (parents, lengths)
    assert torch.equal(two_level.position_ids, tree.position_ids)
    assert torch.equal(two_level.predecessor, tree.predecessor)


def test_two_level_attention_equals_every_path_of_the_depth_one_tree_alone_in_float64_within_1e_10():
    prefix, suffix = TWO_LEVEL_BATCH
    layout = PrefixGroupLayout.from_lengths(prefix, suffix)
    parents, lengths = depth_one_forest(prefix, suffix)
    torch.manual_seed(0)
    q, k, v = (torch.randn(layout.num_tokens, 4, 32, dtype=torch.float64, requires_grad=True) for _ in range(3))
    dout = torch.randn(layout.num_tokens, 4, 32, dtype=torch.float64)
    ours = prefix_grouper_attention(q, k, v, layout, backend="cpu")
    ref = tree_path_attention(q, k, v, parents, lengths)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (ours, *torch.autograd.grad(ours, (q, k, v), dout)),
                          (ref, *torch.autograd.grad(ref, (q, k, v), dout))):
        assert rel_err(a, b) <= 1e-10, name


def test_positions_continue_where_the_parent_ends():
    layout = PrefixTreeLayout.from_parents([-1, 0, 1, 0], [3, 2, 1, 2])
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 3, 4]
    assert layout.depth.tolist() == [0, 1, 2, 1] and layout.longest_path == 6


# ---------------------------------------------------------------- building from token rows
@st.composite
def shared_rows(draw):
    """Rows that share prefixes at several depths: paths of a random tree of random token segments."""
    parents, lengths = draw(forests(max_depth=4))
    segments = [draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)) for n in lengths]
    rows = []
    for s in range(len(parents)):
        path, node = [], s
        while node >= 0:
            path = segments[node] + path
            node = parents[node]
        rows.append(path)
    return draw(st.permutations(rows))


@settings(max_examples=60, deadline=None)
@given(rows=shared_rows(), min_shared=st.integers(1, 6))
def test_from_rows_finds_a_tree_whose_paths_are_the_rows(rows, min_shared):
    layout = PrefixTreeLayout.from_rows(rows, min_shared=min_shared)
    packed = layout.pack_rows(rows)
    index, lengths = layout.path_index()
    for r, row in enumerate(rows):
        assert packed[index[r, : lengths[r]]].tolist() == row
        assert layout.position_ids[index[r, : lengths[r]]].tolist() == list(range(len(row)))
    assert layout.num_tokens <= sum(len(r) for r in rows)
    children = torch.bincount(layout.parents[layout.parents >= 0], minlength=layout.num_segments)
    shared = (children + (torch.bincount(layout.row_leaf, minlength=layout.num_segments) > 0).long()) >= 2
    assert bool((layout.lengths[shared] >= min_shared).all())  # a shared segment is worth sharing


def test_from_rows_attention_equals_each_row_alone():
    rows = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 9, 9], [1, 2, 3, 4, 5, 6, 8, 8], [2, 2], [1, 2, 3, 4]]
    layout = PrefixTreeLayout.from_rows(rows, min_shared=2)
    torch.manual_seed(0)
    x = torch.randn(layout.num_tokens, 2, 16, dtype=torch.float64)
    out = prefix_grouper_attention(x, x, x, layout, backend="cpu")
    index, lengths = layout.path_index()
    for r in range(len(rows)):
        rows_r = index[r, : lengths[r]]
        alone = dense_causal_attention(x[rows_r], x[rows_r], x[rows_r])
        assert (out[rows_r] - alone).abs().max() <= 1e-12


def test_a_shared_prefix_shorter_than_min_shared_is_repeated_not_shared():
    rows = [[7, 1, 1, 1], [7, 2, 2, 2]]
    assert PrefixTreeLayout.from_rows(rows, min_shared=1).num_segments == 3
    short = PrefixTreeLayout.from_rows(rows, min_shared=2)
    assert short.num_segments == 2 and short.num_tokens == 8


# ---------------------------------------------------------------- bad trees
@pytest.mark.parametrize(
    "parents, lengths, match",
    [
        ([-1, 2, 1], [3, 2, 2], r"segment 1 names parent 2, which is not listed before it .*cycle"),
        ([-1, 0, 0], [3, 0, 2], r"segment 1 is empty"),
        ([-1, 5], [3, 2], r"segment 1 names parent 5, which does not exist"),
        ([-1, 0], [3], r"parents lists 2 segments but lengths lists 1"),
    ],
)
def test_bad_trees_are_refused_naming_the_segment(parents, lengths, match):
    with pytest.raises(ValueError, match=match):
        PrefixTreeLayout.from_parents(parents, lengths)


def test_a_tree_that_does_not_match_the_tokens_is_refused():
    layout = PrefixTreeLayout.from_parents([-1, 0, 0], [2, 1, 2])
    with pytest.raises(ValueError, match=r"row 1 disagrees with row 0 on the tokens of shared segment 0"):
        layout.pack_rows([[5, 6, 7], [5, 9, 8, 8]], leaves=[1, 2])
    with pytest.raises(ValueError, match=r"row 0 has 4 tokens but its path \(to segment 1\) has 3"):
        layout.pack_rows([[5, 6, 7, 7]], leaves=[1])
    with pytest.raises(ValueError, match=r"segments \[2\] lie on no row's path"):
        layout.pack_rows([[5, 6, 7]], leaves=[1])


# ---------------------------------------------------------------- through patch_model
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_three_level_batch_through_patch_model_equals_each_sequence_alone(family):
    """A preamble shared by two questions, each with its completions: the unpatched model on every full row."""
    reference = tiny_causal_lm(family)
    model = patch_model(copy.deepcopy(reference))
    g = torch.Generator().manual_seed(0)
    tok = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()
    preamble, questions = tok(9), [tok(4), tok(6)]
    rows = [preamble + q + tok(n) for q, sizes in zip(questions, ([3, 1, 5], [2, 4])) for n in sizes]
    layout = PrefixTreeLayout.from_rows(rows, min_shared=2)
    assert layout.depth.max() == 2
    with torch.no_grad():
        hidden = model.model(input_ids=layout.pack_rows(rows)[None], prefix_layout=layout).last_hidden_state[0]
        index, lengths = layout.path_index()
        for r, row in enumerate(rows):
            alone = reference.model(input_ids=torch.tensor(row)[None]).last_hidden_state[0]
            assert (hidden[index[r, : lengths[r]]] - alone).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_token_logprobs_over_a_multi_turn_tree_equal_each_conversation_alone(family):
    """Conversations that share their first turns and branch later, every non-first token scored, with gradients."""
    from pg_deepspeed import token_logprobs

    reference = tiny_causal_lm(family)
    model = patch_model(copy.deepcopy(reference))
    g = torch.Generator().manual_seed(1)
    tok = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()
    turn1, turn2a, turn2b = tok(12), tok(6), tok(5)
    rows = [turn1 + turn2a + tok(4), turn1 + turn2a + tok(7), turn1 + turn2b + tok(3), tok(9)]
    layout = PrefixTreeLayout.from_rows(rows, min_shared=3)
    assert layout.depth.max() == 2
    ids = layout.pack_rows(rows)
    targets = torch.nonzero(layout.predecessor >= 0).squeeze(1)
    logps = token_logprobs(model, ids, layout, targets)
    index, lengths = layout.path_index()
    scored = torch.zeros(layout.num_tokens).index_put((targets,), logps)
    (-scored.sum()).backward()
    paths = [index[r, : lengths[r]].tolist() for r in range(len(rows))]
    row_logps = [torch.log_softmax(reference(input_ids=torch.tensor(row)[None]).logits[0].float(), -1) for row in rows]
    for r, row in enumerate(rows):
        alone = row_logps[r][:-1].gather(1, torch.tensor(row)[1:, None]).squeeze(1)
        assert (scored[paths[r][1:]].detach() - alone).abs().max() <= 1e-5
    # the reference loss counts each tree token once, read from the first row whose path holds it
    ref_loss = 0.0
    for t in targets.tolist():
        r = next(r for r, path in enumerate(paths) if t in path)
        ref_loss = ref_loss - row_logps[r][paths[r].index(t) - 1, int(ids[t])]
    ref_loss.backward()
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        if b.grad is not None and b.grad.norm() > 0:
            assert ((a.grad - b.grad).norm() / b.grad.norm()) <= 1e-4, name
