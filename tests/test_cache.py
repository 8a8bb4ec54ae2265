"""The shared-prefix decode cache (pg_deepspeed/generation/shared_prefix_cache.py) and the rollout modes of
generation/sampling.py.

Every equivalence here is against a naive reference (tests/reference.py's dense attention; each sample's whole
sequence forwarded alone through the unpatched model; stock `model.generate`), and between the two rollout modes
(the brief's A/B check: float32 next-token logits within 1e-5 at every step, identical completions).
"""
import copy
import json
import types

import pytest
import torch
import transformers as tf

from conftest import run_deepspeed
from reference import TINY, dense_causal_attention, tiny_causal_lm, tiny_gpt_oss
from pg_deepspeed import patch_model
from pg_deepspeed.generation.shared_prefix_cache import SharedPrefixCache
from pg_deepspeed.generation.sampling import generate

MODES_ATOL = 1e-5      # shared vs repeat next-token logits, float32 (the bound)
REFERENCE_ATOL = 1e-4  # against each sample's sequence forwarded alone (a different summation order over ~20 keys)


# ------------------------------------------------------------------------------------------ the attention maths
def _filled_cache(prompt_lens, sizes, P, Hkv, D, t, seed):
    """A cache after a prefill of random prompt K/V and t decode tokens per sample; returns it and the K/V."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(P) >= P - torch.tensor(prompt_lens)[:, None]).long()
    cache = SharedPrefixCache(mask, sizes)
    pk, pv = (torch.randn(len(sizes), Hkv, P, D, generator=g, dtype=torch.float64) for _ in range(2))
    cache.update(pk, pv, 0)
    cache.start_decoding()
    gk, gv = (torch.randn(sum(sizes), Hkv, t, D, generator=g, dtype=torch.float64) for _ in range(2))
    keys, values = cache.update(gk, gv, 0)
    return cache, mask, pk, pv, keys, values


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("s", [1, 3])
@pytest.mark.parametrize("sinks", [False, True])
def test_attend_equals_dense_attention_over_each_samples_prompt_and_own_tokens(seed, s, sinks):
    """Left-padded prompts of different lengths, groups of different G (and equal G), GQA (4 q heads on 2 KV heads),
    an odd scaling, s new queries per sample (bottom-right causal over its own t keys), optional sinks."""
    g = torch.Generator().manual_seed(100 + seed)
    Hq, Hkv, D, P, t = 4, 2, 8, 7, 5
    sizes = [[2, 3, 1], [3, 3], [1], [4, 1, 2]][seed]
    prompt_lens = [int(torch.randint(1, P + 1, (1,), generator=g)) for _ in sizes]
    cache, mask, pk, pv, keys, values = _filled_cache(prompt_lens, sizes, P, Hkv, D, t, seed)
    N = sum(sizes)
    q = torch.randn(N, Hq, s, D, generator=g, dtype=torch.float64)
    sink = torch.randn(Hq, generator=g, dtype=torch.float64) if sinks else None
    module = types.SimpleNamespace(layer_idx=0, config=None)
    out, _ = cache.attend(module, q, keys, values, None, scaling=0.37, s_aux=sink)

    group = [b for b, G in enumerate(sizes) for _ in range(G)]
    for n, b in enumerate(group):
        real = mask[b].bool()
        k = torch.cat([pk[b][:, real], keys[n]], 1).transpose(0, 1)  # [L, Hkv, D]
        v = torch.cat([pv[b][:, real], values[n]], 1).transpose(0, 1)
        L = k.shape[0]
        qq = torch.zeros(L, Hq, D, dtype=torch.float64)
        qq[L - s:] = q[n].transpose(0, 1)  # the s queries are the last s positions
        ref = dense_causal_attention(qq, k, v, scale=0.37, sinks=sink)[L - s:]
        assert (out[n] - ref).abs().max().item() <= 1e-12


def test_the_cache_holds_each_prompt_once():
    prompt_lens, sizes, P, Hkv, D, t = [3, 7], [4, 2], 7, 2, 8, 5
    cache, *_ = _filled_cache(prompt_lens, sizes, P, Hkv, D, t, 0)
    assert cache.nbytes() == 2 * (len(sizes) * P + sum(sizes) * t) * Hkv * D * 8  # K and V, float64


def test_bad_prompts_and_foreign_keys_are_refused():
    with pytest.raises(ValueError, match="prompt 1 has no token"):
        SharedPrefixCache(torch.tensor([[1, 1], [0, 0]]), 2)
    with pytest.raises(ValueError, match="left-padded"):
        SharedPrefixCache(torch.tensor([[1, 0], [1, 1]]), 2)
    with pytest.raises(ValueError, match="one G >= 1 per prompt"):
        SharedPrefixCache(torch.tensor([[1, 1]]), [2, 2])
    cache, mask, pk, pv, keys, values = _filled_cache([2, 3], [2, 1], 3, 2, 8, 2, 0)
    q = torch.randn(3, 4, 1, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="cross-layer KV sharing"):  # keys not returned by this layer's update
        cache.attend(types.SimpleNamespace(layer_idx=0, config=None), q, keys.clone(), values, None)
    module = types.SimpleNamespace(layer_idx=0, config=None)
    for kwargs, match in ((dict(softcap=30.0), "softcapping"), (dict(dropout=0.1), "dropout"),
                          (dict(alibi_slopes=torch.ones(4)), r"\['alibi_slopes'\]")):
        with pytest.raises(ValueError, match=match):  # maths the cache does not implement is refused, not dropped
            cache.attend(module, q, keys, values, None, **kwargs)
    with pytest.raises(RuntimeError, match="cannot be repeated"):
        cache.batch_repeat_interleave(2)


# ------------------------------------------------------------------------------------------ through models
def _gemma():
    return tf.GemmaForCausalLM(tf.GemmaConfig(**TINY, head_dim=16, attn_implementation="sdpa")).eval()


def _gemma2_no_softcap():
    """Gemma 2's alternating sliding windows and query_pre_attn_scalar scaling (7, so the scale is not 1/sqrt(D))."""
    config = tf.Gemma2Config(**TINY, head_dim=16, sliding_window=4096, query_pre_attn_scalar=7,
                             attn_logit_softcapping=None, final_logit_softcapping=None, attn_implementation="eager")
    return tf.Gemma2ForCausalLM(config).eval()


FAMILIES = {
    **{name: (lambda name=name: tiny_causal_lm(name)) for name in ("llama", "qwen2", "qwen3", "phi3", "qwen3_moe")},
    "gemma": _gemma,
    "gemma2": _gemma2_no_softcap,
    "gpt_oss": tiny_gpt_oss,  # sinks, and 64-token sliding windows the test stays within
}


def _prompts(seed: int):
    """Three left-padded prompts of 2, 9 and 5 tokens (width 9) from tokens 3.. (0 pad, 2 EOS)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (3, 9), generator=g)
    mask = (torch.arange(9) >= 9 - torch.tensor([2, 9, 5])[:, None]).long()
    return ids, mask


def _generate(model, ids, mask, sizes, mode, seed=1, steps=6, temperature=1.0, prefill_chunk=0):
    torch.manual_seed(0)
    return generate(model, ids, mask, sizes, max_new_tokens=steps, temperature=temperature, top_p=1.0, eos_id=2,
                    pad_id=0, generator=torch.Generator().manual_seed(seed), cache=mode, keep_logits=True,
                    prefill_chunk=prefill_chunk)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shared_and_repeated_caches_give_the_same_logits_and_completions_and_match_each_sample_alone(family):
    torch.manual_seed(0)
    reference = FAMILIES[family]()
    model = patch_model(copy.deepcopy(reference), max_length=32)
    ids, mask = _prompts(0)
    sizes = [2, 3, 1]
    shared = _generate(model, ids, mask, sizes, "shared")
    repeat = _generate(model, ids, mask, sizes, "repeat")
    assert torch.equal(shared.completion_ids, repeat.completion_ids)
    assert len(shared.step_logits) == len(repeat.step_logits) == shared.completion_ids.shape[1]
    for step, (a, b) in enumerate(zip(shared.step_logits, repeat.step_logits)):
        assert (a - b).abs().max().item() <= MODES_ATOL, f"step {step}"

    # the naive reference: each sample's [real prompt ; tokens fed so far] through the unpatched model, no cache
    steps = len(shared.step_logits)
    group = [b for b, G in enumerate(sizes) for _ in range(G)]
    with torch.no_grad():
        for n, b in enumerate(group):
            prompt = ids[b][mask[b].bool()]
            seq = torch.cat([prompt, shared.completion_ids[n, : steps - 1]])
            logits = reference(input_ids=seq[None]).logits[0, len(prompt) - 1:]
            ours = torch.stack([step_logits[n] for step_logits in shared.step_logits])
            assert (ours - logits).abs().max().item() <= REFERENCE_ATOL, f"sample {n}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_prefill_in_chunks_gives_the_logits_and_completions_of_one_prefill(family):
    """Chunks of 3, 6 and 12 tokens over 3 prompts (1, 2 and 4 columns each) of 2, 9 and 5 tokens left-padded to 9:
    chunks that are all pad for a row, a chunk that splits a prompt, a last chunk narrower than the rest. Both caches;
    float32 next-token logits within MODES_ATOL of one prefill at every step, identical completions."""
    torch.manual_seed(0)
    model = patch_model(FAMILIES[family](), max_length=32)
    ids, mask = _prompts(1)
    for mode in ("shared", "repeat"):
        whole = _generate(model, ids, mask, [2, 3, 1], mode, prefill_chunk=0)
        for chunk in (3, 6, 12):
            chunked = _generate(model, ids, mask, [2, 3, 1], mode, prefill_chunk=chunk)
            assert torch.equal(chunked.completion_ids, whole.completion_ids), (mode, chunk)
            for step, (a, b) in enumerate(zip(chunked.step_logits, whole.step_logits)):
                assert (a - b).abs().max().item() <= MODES_ATOL, (mode, chunk, step)


def test_the_shared_cache_refuses_a_prefill_longer_than_its_prompt_and_decoding_before_the_prompt_is_whole():
    mask = torch.ones(2, 5, dtype=torch.long)
    k = torch.randn(2, 1, 3, 4)
    cache = SharedPrefixCache(mask, 2)
    cache.update(k, k, 0)
    with pytest.raises(RuntimeError, match=r"all 5 prompt columns of every layer \(layers \[0\] incomplete\)"):
        cache.start_decoding()
    with pytest.raises(ValueError, match="the prefill wrote 6 prompt columns, more than the prompt_mask's 5"):
        cache.update(k, k, 0)
    cache.update(k[:, :, :2], k[:, :, :2], 0)
    cache.start_decoding()
    assert torch.equal(cache.layers[0].prompt_keys, torch.cat([k, k[:, :, :2]], 2))


def test_a_negative_prefill_chunk_is_refused():
    with pytest.raises(ValueError, match="prefill_chunk must be >= 0"):
        _generate(tiny_causal_lm("llama"), *_prompts(0), 2, "shared", prefill_chunk=-1)


def test_equal_group_sizes_give_the_same_completions_and_logits_in_the_shared_and_repeated_caches():
    """One int G for every prompt: the shared cache's equal-size path (samples reshaped to groups, no padding)."""
    model = patch_model(tiny_causal_lm("llama"))
    ids, mask = _prompts(3)
    a, b = (_generate(model, ids, mask, 4, mode, seed=7, steps=8) for mode in ("shared", "repeat"))
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert max((x - y).abs().max().item() for x, y in zip(a.step_logits, b.step_logits)) <= MODES_ATOL


def test_shared_cache_logits_match_stock_generate_with_num_return_sequences():
    """Stock `model.generate(num_return_sequences=G)` with top-k 1 (every return sequence the argmax path); ours at a
    temperature of 1e-6 samples the argmax too. Same tokens, same raw logits at every step."""
    reference = tiny_causal_lm("qwen2")
    model = patch_model(copy.deepcopy(reference))
    ids, mask = _prompts(5)
    G, steps = 3, 6
    stock = reference.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=1, num_return_sequences=G,
                               max_new_tokens=steps, min_new_tokens=steps, output_logits=True,
                               return_dict_in_generate=True, eos_token_id=2, pad_token_id=0)
    ours = _generate(model, ids, mask, G, "shared", steps=steps, temperature=1e-6)
    assert torch.equal(ours.completion_ids, stock.sequences[:, ids.shape[1]:])
    for step, (a, b) in enumerate(zip(ours.step_logits, stock.logits)):
        assert (a - b).abs().max().item() <= REFERENCE_ATOL, f"step {step}"


def test_a_window_that_a_sequence_would_exceed_is_refused_by_name():
    model = patch_model(tiny_gpt_oss(), max_length=64)
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"67 attended tokens exceeds the model's attention window \(64\)"):
        _generate(model, ids, torch.ones_like(ids), 2, "shared", steps=8)


def test_an_unpatched_model_is_refused_rather_than_attending_without_its_prompt():
    model = tiny_causal_lm("llama")
    ids, mask = _prompts(0)
    with pytest.raises(RuntimeError, match="must be patched"):
        _generate(model, ids, mask, 2, "shared")


def test_an_unknown_cache_mode_is_refused():
    with pytest.raises(ValueError, match="cache must be one of"):
        _generate(tiny_causal_lm("llama"), *_prompts(0), 2, "paged")


# ------------------------------------------------------------------------------------------ ZeRO-3, two ranks
def test_zero3_rollouts_gathering_once_or_per_layer_give_identical_completions(tmp_path):
    """tests/dist/rollout_gather.py through the real launcher (two CPU ranks, ZeRO-3, tiny Qwen2 sharded at birth)."""
    result = run_deepspeed("tests/dist/rollout_gather.py", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:]
    ranks = json.loads((tmp_path / "result.json").read_text())
    for r in ranks:
        for phase in ("before_step", "after_step"):
            assert r[f"{phase}/partitioned_after"], "the weights must be partitioned again after a rollout"
            for steps in (3, 9):
                runs = {(c, g): r[f"{phase}/{c}/{g}/{steps}"]
                        for c in ("shared", "repeat") for g in ("per_layer", "full")}
                completions = [v["completions"] for v in runs.values()]
                if steps == 9:  # a prefill in chunks samples what the whole prefill does
                    completions += [r[f"{phase}/{c}/per_layer/9/chunked"]["completions"] for c in ("shared", "repeat")]
                assert all(c == completions[0] for c in completions), (r["rank"], phase, steps)
                assert runs[("shared", "full")]["all_gathers"] == runs[("repeat", "full")]["all_gathers"] == 0
            # per-layer gathering pays collectives at every token; the one-off gather does not
            assert (r[f"{phase}/shared/per_layer/9"]["all_gathers"] > r[f"{phase}/shared/per_layer/3"]["all_gathers"]
                    > 0)
        assert r["before_step/shared/full/9"]["completions"] != r["after_step/shared/full/9"]["completions"]
        # the held-out evaluation (3 batches, greedy and sampled each) gathers the whole model once under "full"
        evaluations = {g: r[f"evaluation/{g}"] for g in ("per_layer", "full")}
        assert evaluations["full"]["metrics"] == evaluations["per_layer"]["metrics"]
        assert 0 < evaluations["full"]["metrics"]["eval/reward_mean"] < 1
        assert evaluations["full"]["all_gathers"] == r["whole_model_gathers"] > 0
        assert evaluations["per_layer"]["all_gathers"] > evaluations["full"]["all_gathers"]
    assert ranks[0]["before_step/shared/full/9"]["completions"] != ranks[1]["before_step/shared/full/9"]["completions"]


def test_temperature_zero_is_greedy_decoding_as_stock_generate_does_it():
    reference = tiny_causal_lm("llama")
    model = patch_model(copy.deepcopy(reference))
    ids, mask = _prompts(4)
    stock = reference.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                               min_new_tokens=6, eos_token_id=2, pad_token_id=0)
    for seed in (1, 2):  # the generator is not drawn from: any seed gives the same tokens
        ours = _generate(model, ids, mask, 2, "shared", seed=seed, steps=6, temperature=0.0)
        assert torch.equal(ours.completion_ids, stock[:, ids.shape[1]:].repeat_interleave(2, 0))
