"""patch_model: prefix-grouped forward with a layout, the original model without one, clear refusals."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf

from pg_deepspeed import PrefixGroupLayout, patch_model
from reference import TINY, TINY_FAMILIES, member_hidden_states, tiny_causal_lm


def _random_layout(seed: int):
    """(layout, packed ids [T], prompts per group, completions per member, group sizes)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    tokens = lambda n: torch.randint(0, 128, (n,), generator=g)
    sizes = [rand(1, 3) for _ in range(rand(1, 3))]
    prompts = [tokens(rand(1, 8)) for _ in sizes]
    completions = [tokens(rand(1, 5)) for _ in range(sum(sizes))]
    starts = [sum(sizes[:g]) for g in range(len(sizes) + 1)]
    members = [completions[starts[g] : starts[g + 1]] for g in range(len(sizes))]
    layout = PrefixGroupLayout.from_lengths([len(p) for p in prompts], [[len(c) for c in m] for m in members])
    ids = torch.cat([torch.cat([p, *m]) for p, m in zip(prompts, members)])
    return layout, ids, prompts, completions, sizes


def _group_of(member: int, sizes: list[int]) -> int:
    return next(g for g in range(len(sizes)) if member < sum(sizes[: g + 1]))


def _completion_rows(layout: PrefixGroupLayout, member: int) -> torch.Tensor:
    """Packed indices of `member`'s completion tokens, in order."""
    return layout.suffix_index[layout.suffix_row == member]


def _prompt_rows(layout: PrefixGroupLayout) -> torch.Tensor:
    """Packed indices of every prompt token, in packed order."""
    is_prompt = torch.ones(layout.num_tokens, dtype=torch.bool).index_fill(0, layout.suffix_index, False)
    return torch.nonzero(is_prompt).squeeze(1)


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _left_padded_batch():
    ids = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3], mask[1, :1] = 0, 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_packed_forward_equals_each_member_alone(family):
    reference = tiny_causal_lm(family)
    model = patch_model(copy.deepcopy(reference))
    for seed in range(2):
        layout, ids, prompts, completions, sizes = _random_layout(seed)
        with torch.no_grad():
            hidden = model.model(input_ids=ids[None], prefix_layout=layout).last_hidden_state[0]
            expected = member_hidden_states(reference.model, prompts, completions, sizes)
        for n, ref in enumerate(expected):
            p = len(prompts[_group_of(n, sizes)])
            assert (hidden[_completion_rows(layout, n)] - ref[p:]).abs().max() <= 1e-5
        first_members = [sum(sizes[:g]) for g in range(len(sizes))]
        prompts_alone = torch.cat([expected[n][: len(prompts[g])] for g, n in enumerate(first_members)])
        assert (hidden[_prompt_rows(layout)] - prompts_alone).abs().max() <= 1e-5


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_without_layout_the_original_model_runs(family, attn_implementation):
    reference = tiny_causal_lm(family, attn_implementation=attn_implementation)
    model = patch_model(copy.deepcopy(reference))
    assert model.config._attn_implementation == "prefix_grouper"
    ids, mask = _left_padded_batch()
    assert torch.equal(_logits(model, ids, mask), _logits(reference, ids, mask))
    generate = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True,
                    return_dict_in_generate=True)
    ours, theirs = model.generate(**generate), reference.generate(**generate)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, theirs.logits))


def test_layout_forward_builds_no_mask_and_plain_forward_keeps_its_mask():
    model = patch_model(tiny_causal_lm("llama"))
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True
    )
    layout, ids, *_ = _random_layout(0)
    with torch.no_grad():
        model(input_ids=ids[None], prefix_layout=layout)
        model(*_left_padded_batch())
    assert seen[0] is None
    assert isinstance(seen[1], torch.Tensor) and seen[1].shape[-2:] == (7, 7)


def test_position_ids_default_to_the_layouts():
    model = patch_model(tiny_causal_lm("qwen2"))
    layout, ids, *_ = _random_layout(1)
    with torch.no_grad():
        implicit = model(input_ids=ids[None], prefix_layout=layout).logits
        explicit = model(input_ids=ids[None], position_ids=layout.position_ids[None], prefix_layout=layout).logits
        shifted = model(input_ids=ids[None], position_ids=torch.arange(len(ids))[None], prefix_layout=layout).logits
    assert torch.equal(implicit, explicit)
    assert (implicit - shifted).abs().max() > 1e-3


def test_patching_twice_is_harmless():
    reference = tiny_causal_lm("llama")
    once = patch_model(copy.deepcopy(reference))
    twice = patch_model(patch_model(copy.deepcopy(reference)))
    assert len(twice._forward_pre_hooks) == len(once._forward_pre_hooks) == 1
    assert twice._prefix_grouper.original == "sdpa"
    ids, mask = _left_padded_batch()
    layout, packed, *_ = _random_layout(2)
    assert torch.equal(_logits(twice, ids, mask), _logits(reference, ids, mask))
    with torch.no_grad():
        assert torch.equal(twice(input_ids=packed[None], prefix_layout=layout).logits,
                           once(input_ids=packed[None], prefix_layout=layout).logits)


def test_a_deep_copy_stays_patched():
    model = patch_model(tiny_causal_lm("qwen3"))
    clone = copy.deepcopy(model)
    layout, ids, *_ = _random_layout(3)
    with torch.no_grad():
        assert torch.equal(clone(input_ids=ids[None], prefix_layout=layout).logits,
                           model(input_ids=ids[None], prefix_layout=layout).logits)


def test_saved_model_carries_no_trace_of_the_patch(tmp_path):
    reference = tiny_causal_lm("llama")
    patch_model(copy.deepcopy(reference)).save_pretrained(tmp_path)
    assert "prefix_grouper" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = _left_padded_batch()
    assert torch.equal(_logits(reloaded, ids, mask), _logits(reference, ids, mask))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attention_mask=True), "attention_mask=None"),
        (dict(use_cache=True), "use_cache"),
        (dict(trim=1), r"input_ids \[1, \d+\]"),
    ],
)
def test_bad_packed_calls_raise(kwargs, match):
    model = patch_model(tiny_causal_lm("llama"))
    layout, ids, *_ = _random_layout(0)
    call = dict(input_ids=ids[None, : len(ids) - kwargs.pop("trim", 0)], prefix_layout=layout)
    if kwargs.pop("attention_mask", False):
        call["attention_mask"] = torch.ones_like(call["input_ids"])
    with pytest.raises(ValueError, match=match):
        model(**call, **kwargs)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_kv_cache_under_either_name_is_refused_with_a_layout(name):
    """transformers 5.24 renamed `past_key_values` to `cache`: neither name may slip past the packed-call check."""
    model = patch_model(tiny_causal_lm("llama"))
    layout, ids, *_ = _random_layout(0)
    with pytest.raises(ValueError, match=rf"^{name} cannot be combined with a prefix_layout"):
        model(input_ids=ids[None], prefix_layout=layout, **{name: tf.DynamicCache(config=model.config)})


def test_attention_dropout_is_refused_in_a_packed_training_forward():
    model = patch_model(tiny_causal_lm("llama", attention_dropout=0.1)).train()
    layout, ids, *_ = _random_layout(0)
    with pytest.raises(ValueError, match="dropout"):
        model(input_ids=ids[None], prefix_layout=layout)


def test_a_window_longer_than_max_length_is_accepted_and_checked_per_call():
    reference = tiny_causal_lm("mistral", sliding_window=12)
    model = patch_model(copy.deepcopy(reference), max_length=12)
    short = PrefixGroupLayout.from_lengths([7, 3], [[5, 2], [9]])
    ids = torch.randint(0, 128, (short.num_tokens,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.model(input_ids=ids[None], prefix_layout=short).last_hidden_state[0]
        alone = reference.model(input_ids=torch.cat([ids[:7], ids[12:14]])[None]).last_hidden_state[0]
    assert (hidden[12:14] - alone[7:]).abs().max() <= 1e-5
    long = PrefixGroupLayout.from_lengths([8], [[5]])
    with pytest.raises(ValueError, match="13 tokens exceeds the model's attention window \\(12\\)"):
        model(input_ids=ids[None, :13], prefix_layout=long)


def _gemma2():
    return tf.Gemma2ForCausalLM(tf.Gemma2Config(**TINY, head_dim=16, sliding_window=4096))


def _llama4_chunked():
    config = tf.Llama4TextConfig(
        **TINY, head_dim=16, attention_chunk_size=32, num_local_experts=2, intermediate_size_mlp=128
    )
    return tf.Llama4ForCausalLM(config)


def _qwen3_next():
    config = tf.Qwen3NextConfig(
        **TINY, head_dim=16, num_experts=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    )
    return tf.Qwen3NextForCausalLM(config)


def _mamba():
    return tf.MambaForCausalLM(tf.MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=128))


def _t5():
    config = tf.T5Config(d_model=64, d_ff=128, num_layers=1, num_heads=4, d_kv=16, vocab_size=128)
    return tf.T5ForConditionalGeneration(config)


def _doge():
    config = tf.DogeConfig(**{**TINY, "keep_window_size": 8})
    return tf.DogeForCausalLM(config)


def _roberta_decoder():
    config = tf.RobertaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                              vocab_size=128, is_decoder=True)
    return tf.RobertaForCausalLM(config)


@pytest.mark.parametrize(
    "build, match",
    [
        (_doge, "doge adds a learned per-key bias"),
        (_roberta_decoder, r"roberta numbers positions from padding_idx \+ 1"),
        (_gemma2, r"attention-logit softcapping \(attn_logit_softcapping=50.0\)"),
        (lambda: tiny_causal_lm("mistral", sliding_window=16), "sliding_window=16 would cut into .* max_length=256"),
        (_llama4_chunked, "attention_chunk_size=32 would cut into"),
        (_qwen3_next, r"linear-attention or hybrid layers \(linear_attention\)"),
        (_mamba, "does not route its attention through transformers' AttentionInterface"),
        (_t5, "encoder-decoder models are not supported"),
    ],
    ids=["doge-own-mask", "roberta-positions", "gemma2-softcap", "mistral-sliding", "llama4-chunked", "qwen3next-linear", "mamba", "t5-encoder-decoder"],
)
def test_unsupported_models_are_refused_at_patch_time_and_left_unchanged(build, match):
    model = build()
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match=match):
        patch_model(model)
    assert model.config._attn_implementation == before
    assert not hasattr(model, "_prefix_grouper")


@pytest.mark.parametrize(
    "kwargs, match", [(dict(backend="triton"), "unknown attention backend"), (dict(max_length=0), "max_length")]
)
def test_bad_patch_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        patch_model(tiny_causal_lm("llama"), **kwargs)


def test_non_models_are_rejected():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch_model(torch.nn.Linear(2, 2))


def test_generate_with_a_static_cache_builds_the_original_masks():
    reference = tiny_causal_lm("llama")
    model = patch_model(copy.deepcopy(reference))
    ids, mask = _left_padded_batch()
    generate = dict(
        input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, cache_implementation="static"
    )
    assert torch.equal(model.generate(**generate), reference.generate(**generate))


def test_repatching_after_switching_implementation_falls_back_to_the_new_one():
    model = patch_model(tiny_causal_lm("llama"))
    model.set_attn_implementation("eager")
    patch_model(model)
    assert model.config._attn_implementation == "prefix_grouper"
    assert model._prefix_grouper.original == "eager"


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_patching_one_model_leaves_a_model_built_from_the_same_config_unchanged(family):
    """transformers' from_config shares one config object between models; the patch must not reach the other."""
    shared = tiny_causal_lm(family).config
    model, other = (tf.AutoModelForCausalLM.from_config(shared).eval() for _ in range(2))
    assert other.config is shared
    ids, mask = _left_padded_batch()
    greedy = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    logits, sequences = _logits(other, ids, mask), other.generate(**greedy)
    patch_model(model)
    assert shared._attn_implementation == "sdpa" and other.config._attn_implementation == "sdpa"
    assert torch.equal(_logits(other, ids, mask), logits)
    assert torch.equal(other.generate(**greedy), sequences)


def test_a_model_built_from_a_patched_config_keeps_its_original_attention_and_refuses_layouts():
    model = patch_model(tiny_causal_lm("llama"))
    sibling = tf.AutoModelForCausalLM.from_config(model.config).eval()
    sibling.load_state_dict(model.state_dict())
    ids, mask = _left_padded_batch()
    assert torch.equal(_logits(sibling, ids, mask), _logits(model, ids, mask))
    layout, packed, *_ = _random_layout(0)
    with pytest.raises(RuntimeError, match="was not patched"):
        sibling(input_ids=packed[None], prefix_layout=layout)
    patch_model(sibling)
    assert sibling._prefix_grouper.original == "sdpa"


def test_an_attention_argument_the_grouped_path_does_not_implement_is_refused_not_dropped():
    model = patch_model(tiny_causal_lm("llama"))
    layout, ids, *_ = _random_layout(0)
    lengths = torch.tensor([0, layout.num_tokens], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"attention arguments \['cu_seq_lens_q'\] .* refusing rather than dropping"):
        model(input_ids=ids[None], prefix_layout=layout, cu_seq_lens_q=lengths)


def _llama4(**overrides):
    """A tiny Llama 4 text model whose layer 1 is NoPE (no_rope_layers[1] == 0) with attention temperature tuning."""
    config = tf.Llama4TextConfig(**{
        **TINY, "head_dim": 16, "num_local_experts": 2, "intermediate_size_mlp": 128, "attention_chunk_size": 256,
        "no_rope_layers": [1, 0], "attn_temperature_tuning": True, "floor_scale": 16, "attn_scale": 0.5,
        **overrides,
    })
    torch.manual_seed(0)
    return tf.Llama4ForCausalLM(config).eval()


def test_llama4_nope_temperature_is_exact_below_floor_scale_and_refused_above():
    """Llama 4 scales NoPE-layer queries by the packed index (not the position): exact while the row is shorter
    than floor_scale, refused per call beyond it (the grouped result would differ from the members alone)."""
    reference = _llama4()
    model = patch_model(copy.deepcopy(reference))
    g = torch.Generator().manual_seed(0)
    short = PrefixGroupLayout.from_lengths([6], [[4, 5]])  # 15 tokens < floor_scale 16
    ids = torch.randint(3, 128, (short.num_tokens,), generator=g)
    with torch.no_grad():
        hidden = model.model(input_ids=ids[None], prefix_layout=short).last_hidden_state[0]
        alone = reference.model(input_ids=torch.cat([ids[:6], ids[10:15]])[None]).last_hidden_state[0]
    assert (hidden[10:15] - alone[6:]).abs().max() <= 1e-5
    long = PrefixGroupLayout.from_lengths([6], [[4, 5, 3]])  # 18 tokens: indices past 15 would be scaled
    ids = torch.randint(3, 128, (long.num_tokens,), generator=g)
    with pytest.raises(ValueError, match=r"packed row holds 18 tokens, more than the 15 .* Llama 4 .* floor_scale=16"):
        model(input_ids=ids[None], prefix_layout=long)
    without_tuning = patch_model(_llama4(attn_temperature_tuning=False))
    with torch.no_grad():
        without_tuning(input_ids=ids[None], prefix_layout=long)


def test_a_mask_a_module_builds_itself_is_refused_under_a_layout():
    """Our mask function builds none under a layout, so a mask reaching attention is a module's own (doge's kind)."""
    model = patch_model(tiny_causal_lm("llama"))
    layout, ids, *_ = _random_layout(0)

    def own_mask(_module, args, kwargs):
        return args, {**kwargs, "attention_mask": torch.zeros(1, 1, layout.num_tokens, layout.num_tokens)}

    model.model.layers[1].self_attn.register_forward_pre_hook(own_mask, with_kwargs=True)
    with pytest.raises(ValueError, match="LlamaAttention builds its own attention mask"):
        model(input_ids=ids[None], prefix_layout=layout)


def test_a_float32_model_under_bfloat16_autocast_runs_grouped_like_sdpa():
    """Trainers (TRL with bf16=True) run a float32 model under autocast: RoPE leaves q, k in float32, v in bfloat16."""
    reference = tiny_causal_lm("qwen2")
    model = patch_model(copy.deepcopy(reference))
    layout, ids, prompts, completions, sizes = _random_layout(4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(input_ids=ids[None], prefix_layout=layout).last_hidden_state[0].float()
        expected = member_hidden_states(reference.model, prompts, completions, sizes)
    for n, ref in enumerate(expected):
        ours, p = hidden[_completion_rows(layout, n)], len(prompts[_group_of(n, sizes)])
        assert ((ours - ref[p:].float()).norm() / ref[p:].float().norm()) <= 2e-2  # bf16, two layers
