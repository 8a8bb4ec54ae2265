"""What sequence parallelism adds on one process: the pad segment changes no real token, and the LM head can be
called a fixed number of times (so that every rank of a group makes the same ZeRO-3 gathers).

The distributed behaviour (Ulysses, the log-prob gather, the engine's reduction) is tested through the real
launcher in tests/test_sequence_parallel.py.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pg_deepspeed import PrefixGroupLayout, PrefixTreeLayout, prefix_grouper_attention
from pg_deepspeed.models.logprobs import LogitTransform, chunked_head_logprobs
from pg_deepspeed.models.sequence_shards import SequenceShard, pad_layout
from test_tree import forests


def layouts():
    groups = st.lists(st.tuples(st.integers(1, 30), st.lists(st.integers(1, 12), min_size=1, max_size=4)),
                      min_size=1, max_size=4)
    two_level = groups.map(lambda g: PrefixGroupLayout.from_lengths([p for p, _ in g], [s for _, s in g]))
    return st.one_of(two_level, forests().map(lambda f: PrefixTreeLayout.from_parents(*f)))


@settings(max_examples=40, deadline=None)
@given(layout=layouts(), multiple=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_the_pad_is_a_segment_of_its_own_that_changes_no_real_token(layout, multiple, seed):
    padded = pad_layout(layout, multiple)
    T, Tp = layout.num_tokens, padded.num_tokens
    assert Tp % multiple == 0 and T <= Tp < T + multiple
    assert torch.equal(padded.position_ids[:T], layout.position_ids)
    assert torch.equal(padded.predecessor[:T], layout.predecessor)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(Tp, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    q[T:], k[T:], v[T:] = 1e3, 1e3, -1e3  # a pad that would dominate any softmax it entered
    out = prefix_grouper_attention(q, k, v, padded, backend="cpu")
    assert torch.equal(out[:T], prefix_grouper_attention(q[:T], k[:T], v[:T], layout, backend="cpu"))


def test_a_shard_is_an_equal_contiguous_share():
    shards = [SequenceShard(r, 4, 12) for r in range(4)]
    assert [(s.start, s.stop) for s in shards] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    with pytest.raises(ValueError, match="equal share"):
        SequenceShard(0, 4, 10)


@pytest.mark.parametrize("rows, num_calls", [(0, 1), (0, 3), (5, 2), (5, 4), (9, 9), (9, 12)])
def test_the_head_is_called_exactly_num_calls_times_with_the_same_results_and_gradients(rows, num_calls):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    hidden = torch.randn(rows + 1, 8, requires_grad=True)
    targets = torch.randint(0, 11, (rows,))
    transform = LogitTransform(temperature=0.7)

    want, want_ent = chunked_head_logprobs(head, hidden[:rows], targets, transform, 4, True)
    if rows:
        (want.sum() + want_ent.sum()).backward()
        want_grads = hidden.grad.clone(), head.weight.grad.clone()
    else:  # nothing to score: no call, and a zero gradient
        want_grads = torch.zeros_like(hidden), torch.zeros_like(head.weight)
    hidden.grad, head.weight.grad, calls[:] = None, None, []

    got, got_ent = chunked_head_logprobs(head, hidden[:rows], targets, transform, 4, True,
                                         num_calls=num_calls, spare=hidden[rows:])
    assert len(calls) == num_calls
    (got.sum() + got_ent.sum()).backward()
    assert len(calls) == 2 * num_calls  # each call recomputed in backward: the gathers repeat there too
    # the idle calls come after the usual chunks, so each row's values are bit for bit those without them
    assert torch.equal(got, want) and torch.equal(got_ent, want_ent)
    assert torch.allclose(hidden.grad, want_grads[0], atol=1e-6) and hidden.grad[rows:].abs().max() == 0
    assert torch.allclose(head.weight.grad, want_grads[1], atol=1e-6)


def test_fewer_calls_than_chunks_is_refused():
    head = torch.nn.Linear(8, 11)
    with pytest.raises(ValueError, match="cannot cover 9 rows"):
        chunked_head_logprobs(head, torch.randn(9, 8), torch.zeros(9, dtype=torch.long), LogitTransform(), 4, False,
                              num_calls=2, spare=torch.randn(1, 8))


def test_a_shard_given_to_a_model_without_sequence_parallelism_is_refused_naming_the_function():
    from pg_deepspeed import patch_model
    from reference import tiny_causal_lm

    model = patch_model(tiny_causal_lm("llama"))
    layout = PrefixGroupLayout.from_lengths([6], [[3, 3]])
    shard = SequenceShard(0, 2, layout.num_tokens)
    ids = torch.randint(0, 128, (layout.num_tokens,))
    with pytest.raises(ValueError, match="parallelize_sequence"):
        model.model(input_ids=ids[None, shard.start:shard.stop], prefix_layout=layout, sequence_shard=shard)
