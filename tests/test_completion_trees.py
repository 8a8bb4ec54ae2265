"""Completions sampled as a tree (multi-turn rollouts with --branching): each group's completions packed as the trie of
what they begin with in common, every shared turn forwarded once, and the log-probs and gradients those of each
conversation forwarded alone through the unpatched model."""
from __future__ import annotations

import copy
import pytest
import torch

from pg_deepspeed import completion_logprobs, patch_model
from pg_deepspeed.layouts.packing import completion_trie, pack_completions
from reference import VOCAB, random_tree_batch, tiny_causal_lm, worst_relative_grad_error


def one_by_one_logprobs(reference, prompt_ids, prompt_mask, completion_ids, completion_mask, sizes) -> torch.Tensor:
    """[N, Lc]: each conversation (its prompt's tokens, then its own) forwarded alone through the unpatched model."""
    out = torch.zeros(completion_ids.shape, dtype=torch.float32)
    groups = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    for n, g in enumerate(groups.tolist()):
        prompt = prompt_ids[g][prompt_mask[g].bool()]
        completion = completion_ids[n][completion_mask[n].bool()]
        logits = reference(input_ids=torch.cat([prompt, completion])[None]).logits[0].float()
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1).gather(-1, completion[:, None])[:, 0]
        out = out.index_put((torch.full_like(completion, n), torch.arange(len(completion))), logp)
    return out


def distinct_completion_prefixes(completion_ids, completion_mask, sizes) -> int:
    """Tokens of the completions once each: per group, the number of distinct non-empty prefixes."""
    total, n = 0, 0
    for size in sizes:
        rows = [tuple(completion_ids[m][completion_mask[m].bool()].tolist()) for m in range(n, n + size)]
        total += len({row[:k] for row in rows for k in range(1, len(row) + 1)})
        n += size
    return total


def _pair(family: str):
    reference = tiny_causal_lm(family)
    return patch_model(copy.deepcopy(reference)), reference


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3_moe"])
@pytest.mark.parametrize("seed", range(6))
def test_a_sampling_tree_forwarded_once_gives_each_conversation_s_logprobs_and_gradients(family, seed):
    model, reference = _pair(family)
    model.train(), reference.train()
    batch = random_tree_batch(seed, "left" if seed % 2 else "right")
    tokens, head_rows = [], []
    model.model.embed_tokens.register_forward_hook(lambda _m, args, _o: tokens.append(args[0].numel()))
    model.lm_head.register_forward_hook(lambda _m, args, _o: head_rows.append(args[0].shape[0]))

    logps = completion_logprobs(model, *batch, share_completions=True, chunk_size=7)
    expected = one_by_one_logprobs(reference, *batch)

    assert (logps - expected).abs().max() <= 1e-5
    prompt_tokens = int(batch[1].sum())
    assert tokens == [prompt_tokens + distinct_completion_prefixes(*batch[2:])]  # every shared turn once
    assert sum(head_rows) == distinct_completion_prefixes(*batch[2:])  # and scored once
    advantages = torch.randn(batch[2].shape[0], 1, generator=torch.Generator().manual_seed(seed))
    (advantages * logps).sum().backward()
    (advantages * expected).sum().backward()
    assert worst_relative_grad_error(model, reference) <= 1e-5


def test_a_tree_under_a_shared_preamble_and_the_flat_packing_agree():
    model, _ = _pair("phi3")
    batch = random_tree_batch(11, preamble=6)
    with torch.no_grad():
        tree = completion_logprobs(model, *batch, share_completions=True, preamble=6)
        flat = completion_logprobs(model, *batch)
        standard = completion_logprobs(model, *batch, share_completions=True, prefix_grouping=False)
    assert (tree - flat).abs().max() <= 1e-5 and (standard - flat).abs().max() <= 1e-5


def test_the_trie_shares_exactly_the_common_prefixes_of_branching_2_2_2():
    """Eight leaves of a depth-3 binary tree: 7 inner turns and 8 last turns, 15 segments, each leaf's path 3 long."""
    g = torch.Generator().manual_seed(0)
    turns = {path: torch.randint(3, VOCAB, (4,), generator=g) for path in
             [(a,) for a in range(2)] + [(a, b) for a in range(2) for b in range(2)]
             + [(a, b, c) for a in range(2) for b in range(2) for c in range(2)]}
    leaves = [(a, b, c) for a in range(2) for b in range(2) for c in range(2)]
    completions = torch.stack([torch.cat([turns[leaf[:k]] for k in (1, 2, 3)]) for leaf in leaves])
    packing = pack_completions(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), completions,
                               torch.ones_like(completions), [8], share_completions=True)
    parents, lengths = packing.layout.segments()
    assert lengths == [3] + [4] * 14 and len(parents) == 15
    assert packing.layout.num_tokens == 3 + 14 * 4
    assert packing.layout.prefix_tokens_saved == 8 * (3 + 12) - (3 + 14 * 4)
    assert int(packing.layout.depth.max()) == 3  # prompt -> turn 1 -> turn 2 -> turn 3


def test_completion_trie_of_rows_that_end_inside_others_and_identical_rows():
    lengths = [3, 5, 5, 2]
    rows = [[1, 2, 3], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [9, 9]]
    def common(a: list[int], b: list[int]) -> int:
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        return k

    lcp = [[common(a, b) for b in rows] for a in rows]
    segments, paths = completion_trie(lcp, lengths)
    assert [(p, a, b) for p, _, a, b in segments] == [(-1, 0, 3), (0, 3, 5), (-1, 0, 2)]
    assert paths == [[0], [0, 1], [0, 1], [2]]


def test_prefix_tokens_saved_counts_every_member_even_one_whose_conversation_another_holds_whole():
    """A conversation that ended early stands for several leaves (identical rows) and one row may be the start of
    another: the saving is against each member forwarded alone, not against the trie's leaf paths."""
    completions = torch.tensor([[5, 6, 7], [5, 6, 7], [5, 6, 8], [9, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 0, 0]])
    packing = pack_completions(torch.tensor([[3, 4]]), torch.ones(1, 2, dtype=torch.long), completions, mask, [4],
                               share_completions=True)
    alone = 4 * 2 + (3 + 3 + 3 + 1)
    forwarded = 2 + len({(5,), (5, 6), (5, 6, 7), (5, 6, 8), (9,)})
    assert packing.layout.num_tokens == forwarded
    assert packing.prefix_tokens_saved == alone - forwarded


def test_tokens_outside_the_score_mask_are_context_only_never_through_the_lm_head():
    """A multi-turn batch scores the model's own tokens: observations are attended to, not scored (0 in the result),
    and the scored ones keep each conversation's log-probs."""
    model, reference = _pair("llama")
    batch = random_tree_batch(4)
    completion_mask = batch[3]
    score_mask = completion_mask * (torch.arange(completion_mask.shape[1]) % 3 != 1).long()
    head_rows = []
    model.lm_head.register_forward_hook(lambda _m, args, _o: head_rows.append(args[0].shape[0]))
    with torch.no_grad():
        logps = completion_logprobs(model, *batch, share_completions=True, score_mask=score_mask)
        expected = one_by_one_logprobs(reference, *batch)
    assert (logps - expected * score_mask).abs().max() <= 1e-5
    assert bool((logps[score_mask == 0] == 0).all())
    scored = {(g, tuple(batch[2][n, :c + 1].tolist())) for n, g in enumerate(
        torch.repeat_interleave(torch.arange(len(batch[4])), torch.tensor(batch[4])).tolist())
        for c in range(batch[2].shape[1]) if score_mask[n, c]}
    assert sum(head_rows) == len(scored)  # each distinct scored token of a group once
    padded = (*batch[:2], torch.nn.functional.pad(batch[2], (0, 1)), torch.nn.functional.pad(completion_mask, (0, 1)),
              batch[4])  # one column of padding, which a score mask must not mark
    with pytest.raises(ValueError, match="score_mask .* must mark completion tokens only"):
        completion_logprobs(model, *padded, score_mask=torch.ones_like(padded[3]))
