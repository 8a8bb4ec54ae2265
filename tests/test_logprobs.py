"""completion_logprobs: equal to the unpatched model on the standard padded batch, LM head on completion rows only."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import run_deepspeed
from pg_deepspeed import completion_logprobs, patch_model
from pg_deepspeed.layouts.packing import common_prefix_length
from reference import (TINY_FAMILIES, padded_completion_logprobs, random_grpo_batch, tiny_causal_lm, tiny_gpt_oss,
                       worst_relative_grad_error)

SEEDS = (0, 5, 8)  # 3 groups of mixed sizes; 9 members, five of length 1; a 1-token prompt and completion
GRAD_SEEDS = (0, 1)


def _pair(family: str, **overrides):
    """(patched model, unpatched copy with the same weights)."""
    reference = tiny_causal_lm(family, **overrides)
    return patch_model(copy.deepcopy(reference)), reference


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_logprobs_and_entropies_match_padded_batch(family, padding_side):
    model, reference = _pair(family)
    for seed in SEEDS:
        batch = random_grpo_batch(seed, padding_side)
        with torch.no_grad():
            logps, entropies = completion_logprobs(model, *batch, return_entropy=True, chunk_size=5)
            ref_logps, ref_entropies = padded_completion_logprobs(reference, *batch)
        assert logps.dtype == torch.float32 and logps.shape == batch[3].shape
        assert (logps - ref_logps).abs().max() <= 1e-5
        assert (entropies - ref_entropies).abs().max() <= 1e-5


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_grpo_gradients_match_padded_batch(family, checkpointing):
    model, reference = _pair(family)
    layer_calls = []
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.model.layers[0].self_attn.register_forward_hook(lambda *_: layer_calls.append(1))
    model.train(), reference.train()
    for seed in GRAD_SEEDS:
        batch = random_grpo_batch(seed, "left" if seed % 2 else "right")
        advantages = torch.randn(batch[2].shape[0], 1, generator=torch.Generator().manual_seed(seed))
        model.zero_grad(), reference.zero_grad()
        (advantages * completion_logprobs(model, *batch, chunk_size=4)).sum().backward()
        (advantages * padded_completion_logprobs(reference, *batch)[0]).sum().backward()
        assert worst_relative_grad_error(model, reference) <= 1e-4
    if checkpointing:  # the layers really ran again in backward
        assert len(layer_calls) == 2 * len(GRAD_SEEDS)


def test_entropy_gradients_match_padded_batch():
    model, reference = _pair("qwen2")
    batch = random_grpo_batch(7, "left")
    completion_logprobs(model, *batch, return_entropy=True)[1].sum().backward()
    padded_completion_logprobs(reference, *batch)[1].sum().backward()
    assert worst_relative_grad_error(model, reference) <= 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_standard_path_matches_padded_batch(family):
    model, reference = _pair(family)
    batch = random_grpo_batch(3, "left")
    with torch.no_grad():
        logps = completion_logprobs(model, *batch, prefix_grouping=False)
        ref_logps, _ = padded_completion_logprobs(reference, *batch)
    assert (logps - ref_logps).abs().max() <= 1e-5


def test_temperature_and_final_softcap_follow_trl():
    model, reference = _pair("llama", final_logit_softcapping=2.0)
    batch = random_grpo_batch(4, "right")
    with torch.no_grad():
        logps, entropies = completion_logprobs(model, *batch, temperature=0.6, return_entropy=True)
        ref_logps, ref_entropies = padded_completion_logprobs(reference, *batch, temperature=0.6)
        plain = completion_logprobs(model, *batch)
    assert (logps - ref_logps).abs().max() <= 1e-5
    assert (entropies - ref_entropies).abs().max() <= 1e-5
    assert (logps - plain).abs().max() > 1e-2


def test_masked_positions_are_exactly_zero():
    model, _ = _pair("llama")
    batch = random_grpo_batch(5, "left")
    logps, entropies = completion_logprobs(model, *batch, return_entropy=True)
    padding = batch[3] == 0
    assert padding.any()
    assert bool((logps[padding] == 0).all()) and bool((entropies[padding] == 0).all())
    assert bool((logps[~padding] < 0).all()) and bool((entropies[~padding] > 0).all())


def test_lm_head_sees_only_rows_predicting_completion_tokens():
    model, _ = _pair("qwen2")
    prompt_ids, prompt_mask, completion_ids, completion_mask, sizes = random_grpo_batch(6, "left")
    rows = []
    model.lm_head.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    logps = completion_logprobs(
        model, prompt_ids, prompt_mask, completion_ids, completion_mask, sizes, chunk_size=3
    )
    forward_rows = sum(rows)
    logps.sum().backward()
    # one row per completion token (the prompt's last token once per member), chunks of <= 3, recomputed in backward
    assert forward_rows == int(completion_mask.sum())
    assert sum(rows) == 2 * forward_rows and max(rows) <= 3
    standard_rows = completion_mask.shape[0] * (prompt_ids.shape[1] + completion_ids.shape[1])
    assert forward_rows < standard_rows


def test_unpatched_model_is_refused():
    with pytest.raises(ValueError, match="patch_model"):
        completion_logprobs(tiny_causal_lm("llama"), *random_grpo_batch(0, "left"))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda b: (b[0][:, :-1], *b[1:]), ValueError, "prompt_ids .* prompt_mask"),
        (lambda b: (*b[:2], b[2].float(), *b[3:]), TypeError, "completion_ids must hold integer"),
        (lambda b: (*b[:4], [sum(b[4]) + 1] + [1] * (len(b[4]) - 1)), ValueError, "add up to"),
        (lambda b: (*b[:4], 0), ValueError, "positive ints"),
        (lambda b: (*b[:4], 2.5), TypeError, "group_size"),
    ],
)
def test_bad_inputs_raise_before_the_forward(change, error, match):
    model, _ = _pair("llama")
    with pytest.raises(error, match=match):
        completion_logprobs(model, *change(random_grpo_batch(1, "left")))


@pytest.mark.parametrize("option, value", [("temperature", 0.0), ("chunk_size", 0)])
def test_bad_options_raise(option, value):
    model, _ = _pair("llama")
    with pytest.raises(ValueError, match=option):
        completion_logprobs(model, *random_grpo_batch(1, "left"), **{option: value})


def _truncate(completion_mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """TRL's mask_truncated_completions: the given rows (full-width completions) get an all-zero mask."""
    mask = completion_mask.clone()
    mask[rows] = 0
    return mask


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_all_zero_completion_rows_are_computed_and_ignored(family):
    model, reference = _pair(family)
    model.train(), reference.train()
    prompt_ids, prompt_mask, completion_ids, completion_mask, sizes = random_grpo_batch(5, "left")
    assert sizes == [3, 4, 2]
    truncated = [0, 3, 7, 8]  # the last group is truncated whole
    completion_mask[truncated] = 1  # completions that filled the width ...
    mask = _truncate(completion_mask, truncated)  # ... and were masked as truncated
    advantages = torch.randn(len(mask), 1, generator=torch.Generator().manual_seed(0))
    logps, entropies = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, mask, sizes,
                                           return_entropy=True)
    ref_logps, ref_entropies = padded_completion_logprobs(reference, prompt_ids, prompt_mask, completion_ids, mask,
                                                          sizes)
    assert bool((logps[truncated] == 0).all()) and bool((entropies[truncated] == 0).all())
    assert (logps - ref_logps).abs().max() <= 1e-5 and (entropies - ref_entropies).abs().max() <= 1e-5
    (advantages * logps).sum().backward()
    (advantages * ref_logps).sum().backward()
    assert worst_relative_grad_error(model, reference) <= 1e-4


def test_a_trl_shaped_batch_with_truncated_rows():
    """TRL hands `[prompt | completion]` rows (prompt left-padded, repeated G times) and the mask it attends with."""
    model, reference = _pair("qwen2")
    G, Lc = 3, 5
    prompt_ids, prompt_mask, _, _, _ = random_grpo_batch(2, "left")
    g = torch.Generator().manual_seed(1)
    N = G * len(prompt_ids)
    completion_ids = torch.randint(3, 128, (N, Lc), generator=g)
    completion_mask = (torch.arange(Lc) < torch.randint(1, Lc + 1, (N, 1), generator=g)).long()
    completion_mask[1] = 1
    completion_mask = _truncate(completion_mask, [1])
    input_ids = torch.cat([prompt_ids.repeat_interleave(G, 0), completion_ids], 1)
    attention_mask = torch.cat([prompt_mask.repeat_interleave(G, 0), completion_mask], 1)
    with torch.no_grad():  # the drop-in of docs/models.md's "Replacing a trainer's log-prob function"
        logps = completion_logprobs(model, input_ids[::G, :-Lc], attention_mask[::G, :-Lc], input_ids[:, -Lc:],
                                    attention_mask[:, -Lc:], G)
        ref, _ = padded_completion_logprobs(reference, prompt_ids, prompt_mask, completion_ids, completion_mask, G)
    assert bool((logps[1] == 0).all())
    assert (logps - ref).abs().max() <= 1e-5


def test_gpt_oss_attention_sinks_are_exact_in_logprobs_and_gradients():
    """gpt-oss hands `s_aux` (one sink logit per head) to the attention function; it enters the grouped softmax."""
    reference = tiny_gpt_oss()
    model = patch_model(copy.deepcopy(reference), max_length=64)
    model.train(), reference.train()
    for seed in GRAD_SEEDS:
        batch = random_grpo_batch(seed, "left")
        advantages = torch.randn(batch[2].shape[0], 1, generator=torch.Generator().manual_seed(seed))
        model.zero_grad(), reference.zero_grad()
        logps = completion_logprobs(model, *batch)
        ref_logps, _ = padded_completion_logprobs(reference, *batch)
        assert (logps - ref_logps).abs().max() <= 1e-5
        (advantages * logps).sum().backward()
        (advantages * ref_logps).sum().backward()
        assert worst_relative_grad_error(model, reference) <= 1e-4
        sink_grads = [layer.self_attn.sinks.grad for layer in model.model.layers]
        assert all(g is not None and g.abs().max() > 0 for g in sink_grads)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "phi3"])
def test_a_shared_preamble_computed_once_gives_the_padded_batch_logprobs_and_gradients(family, padding_side):
    """Three levels: a preamble every prompt begins with, each prompt's rest (one prompt has none), completions."""
    model, reference = _pair(family)
    model.train(), reference.train()
    g = torch.Generator().manual_seed(3)
    preamble = torch.randint(3, 128, (11,), generator=g)
    rests = [torch.randint(3, 128, (n,), generator=g) for n in (4, 0, 7)]
    prompts = [torch.cat([preamble, r]) for r in rests]
    Lp = max(len(p) for p in prompts) + 1
    prompt_ids, prompt_mask = torch.zeros(3, Lp, dtype=torch.long), torch.zeros(3, Lp, dtype=torch.long)
    for b, p in enumerate(prompts):
        cols = slice(Lp - len(p), Lp) if padding_side == "left" else slice(0, len(p))
        prompt_ids[b, cols], prompt_mask[b, cols] = p, 1
    sizes = [2, 3, 1]
    lengths = torch.tensor([3, 1, 5, 2, 4, 1])
    completion_ids = torch.randint(3, 128, (6, 5), generator=g)
    completion_mask = (torch.arange(5) < lengths[:, None]).long()
    assert common_prefix_length(prompt_ids, prompt_mask) == 11
    rows = []
    model.lm_head.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    tokens = []
    model.model.embed_tokens.register_forward_hook(lambda _m, args, _o: tokens.append(args[0].numel()))
    batch = (prompt_ids, prompt_mask, completion_ids, completion_mask, sizes)
    logps = completion_logprobs(model, *batch, preamble=11)
    ref, _ = padded_completion_logprobs(reference, *batch)
    assert (logps - ref).abs().max() <= 1e-5
    assert tokens == [11 + 4 + 7 + int(lengths.sum())]  # the preamble once, each prompt's rest once
    advantages = torch.randn(6, 1, generator=g)
    (advantages * logps).sum().backward()
    (advantages * ref).sum().backward()
    assert worst_relative_grad_error(model, reference) <= 1e-4
    two_level = completion_logprobs(model, *batch)
    assert (two_level - logps).abs().max() <= 1e-5


def test_a_preamble_the_prompts_do_not_share_is_refused():
    model, _ = _pair("llama")
    prompt_ids, prompt_mask, *rest = random_grpo_batch(0, "left")
    with pytest.raises(ValueError, match=r"prompt \d does not begin with the 3-token preamble of prompt 0"):
        completion_logprobs(model, prompt_ids, prompt_mask, *rest, preamble=3)
    with pytest.raises(ValueError, match=r"preamble of 99 tokens does not fit the prompts"):
        completion_logprobs(model, prompt_ids, prompt_mask, *rest, preamble=99)


@pytest.mark.distributed
def test_every_pass_makes_the_same_head_calls_on_zero3_ranks_whose_completions_differ(tmp_path):
    """tests/dist/equal_head_calls.py: ranks needing 6 and 1 LM-head calls (chunks of 8 rows) under the shipped
    zero3_cpu.json run the policy (with entropies, backward and step), old, reference and G = 1 passes without a
    collective mismatch, each within 1e-5 of the naive padded forward."""
    run = run_deepspeed("tests/dist/equal_head_calls.py", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["head_calls"] for r in ranks] == [6, 1] and all(r["head_partitioned"] for r in ranks)
    for r in ranks:
        for name in ("policy_error", "entropy_error", "old_error", "reference_error", "warmup_g1_error"):
            assert r[name] < 1e-5, (name, r)
        assert r["weights_moved_and_finite"]
