"""GRPO pieces against hand-computed values: advantages, loss aggregations, rewards, data, rollout stopping."""
import json
import math

import pytest
import torch

from pg_deepspeed.grpo.advantages import group_advantages
from pg_deepspeed.grpo.args import DataArguments
from pg_deepspeed.grpo.data import (SFT_OFFSET, Curriculum, FileDataset, KVRetrievalTask, MajorityDigitTask,
                                    NeedleDigitTask, batch_indices, build_source)
from pg_deepspeed.grpo.setup_checks import curriculum_of
from pg_deepspeed.grpo.loss import grpo_loss
from pg_deepspeed.grpo.rewards import RewardError, compute_rewards, digit_answer, numeric_match, resolve_reward_fn
from pg_deepspeed import patch_model
from pg_deepspeed.generation.sampling import generate
from reference import tiny_causal_lm


# ---------------------------------------------------------------- advantages
def test_grpo_advantage_is_group_zscore_with_unbiased_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    adv = group_advantages(r, torch.tensor([4, 2]), "grpo", eps=1e-4)
    s = math.sqrt(1 / 3) + 1e-4  # unbiased std of [1, 0, 0, 1], plus eps
    assert torch.allclose(adv, torch.tensor([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0.0, 0.0]), atol=1e-6)


def test_dr_grpo_advantage_is_centred_reward():
    adv = group_advantages(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([2, 1]), "dr_grpo")
    assert adv.tolist() == [1.0, -1.0, 0.0]


def test_rloo_advantage_is_reward_minus_mean_of_others():
    adv = group_advantages(torch.tensor([1.0, 2.0, 6.0]), torch.tensor([3]), "rloo")
    assert torch.allclose(adv, torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]), atol=1e-6)


def test_advantages_refuse_wrong_group_sizes():
    with pytest.raises(ValueError, match="group sizes add up to 3 but there are 4 rewards"):
        group_advantages(torch.zeros(4), torch.tensor([2, 1]))


# ---------------------------------------------------------------- loss
def loss_inputs():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    old = torch.tensor([[-1.0, -2.5, 0.0], [-0.2, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([1.0, -2.0])
    return logps, old, None, adv, mask


def hand_per_token(eps=0.2):
    # ratios: e^0 = 1, e^0.5 = 1.6487 (clipped to 1.2 for A>0), e^-0.3 = 0.7408 (clipped to 0.8 for A<0)
    r = [1.0, math.exp(0.5), math.exp(-0.3)]
    return [-min(r[0] * 1, 1.0), -min(r[1] * 1, (1 + eps) * 1), -min(r[2] * -2, (1 - eps) * -2)]


def test_token_mean_loss_matches_hand_computation():
    loss, stats = grpo_loss(*loss_inputs(), epsilon=0.2, aggregation="token-mean")
    assert loss.item() == pytest.approx(sum(hand_per_token()) / 3, rel=1e-6)
    # clipped: token 2 (ratio 1.65 > 1.2 with A > 0) and token 3 (ratio 0.74 < 0.8 with A < 0)
    assert stats["clip_frac"] == pytest.approx(2 / 3)


def test_seq_mean_token_mean_loss_matches_hand_computation():
    t = hand_per_token()
    loss, _ = grpo_loss(*loss_inputs(), aggregation="seq-mean-token-mean")
    assert loss.item() == pytest.approx(((t[0] + t[1]) / 2 + t[2]) / 2, rel=1e-6)


def test_dr_grpo_loss_divides_by_rows_times_max_length():
    loss, _ = grpo_loss(*loss_inputs(), aggregation="dr_grpo", max_completion_length=4)
    assert loss.item() == pytest.approx(sum(hand_per_token()) / (2 * 4), rel=1e-6)


def test_epsilon_high_widens_upper_clip():
    loss, stats = grpo_loss(*loss_inputs(), epsilon=0.2, epsilon_high=1.0)
    t = hand_per_token()
    t[1] = -math.exp(0.5)  # 1.65 < 1 + 1.0: not clipped any more
    assert loss.item() == pytest.approx(sum(t) / 3, rel=1e-6)
    assert stats["clip_frac"] == pytest.approx(1 / 3)  # the low clip of token 3 remains


def test_k3_kl_term_matches_hand_computation():
    logps, old, _, adv, mask = loss_inputs()
    ref = logps - 0.1
    loss, stats = grpo_loss(logps, old, ref, adv, mask, beta=0.5)
    k3 = math.exp(-0.1) + 0.1 - 1
    assert stats["kl"] == pytest.approx(k3, rel=1e-5)
    assert loss.item() == pytest.approx(sum(hand_per_token()) / 3 + 0.5 * k3, rel=1e-5)


def test_loss_refuses_unknown_aggregation():
    with pytest.raises(ValueError, match="unknown loss aggregation 'sum'"):
        grpo_loss(*loss_inputs(), aggregation="sum")


# ---------------------------------------------------------------- rewards
def test_builtin_digit_reward_scores_correct_wellformed_and_other():
    fn = digit_answer(0.2)
    assert fn(["p"] * 4, ["7", " 3", "77", "x"], ["7", "7", "7", "7"]) == [1.0, 0.2, 0.0, 0.0]


def test_numeric_match_compares_numbers():
    assert numeric_match(["p"] * 3, ["x = 2.50", "3", "none"], ["2.5", "4", "1"]) == [1.0, 0.0, 0.0]


def raising_reward(prompts, completions, answers):
    raise KeyError("boom")


def short_reward(prompts, completions, answers):
    return [1.0]


def nan_reward(prompts, completions, answers):
    return [float("nan")] * len(completions)


@pytest.mark.parametrize(
    "fn, message",
    [
        (raising_reward, r"reward function raising_reward raised KeyError"),
        (short_reward, r"reward function short_reward returned 1 rewards for 2 completions"),
        (nan_reward, r"reward function nan_reward returned NaN/inf for completion\(s\) \[0, 1\]"),
    ],
)
def test_misbehaving_reward_function_is_named(fn, message):
    with pytest.raises(RewardError, match=message):
        compute_rewards(fn, ["p", "p"], ["a", "b"], ["a", "a"])


def test_user_reward_function_resolves_from_module_path():
    assert resolve_reward_fn("test_grpo_components:short_reward", synthetic=True, format_reward=0) is short_reward


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:f", r"cannot import module 'no_such_module_xyz'"),
        ("test_grpo_components:missing", r"has no callable 'missing'"),
        ("fuzzy", r"expected one of .* or 'module:function'"),
    ],
)
def test_unknown_reward_function_is_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_reward_fn(spec, synthetic=False, format_reward=0)


# ---------------------------------------------------------------- data
def test_majority_task_answer_is_the_most_frequent_digit():
    task = MajorityDigitTask(prompt_length=300, seed=1)
    for i in range(20):
        ex = task.example(i)
        digits = ex.prompt.split(":")[1].split("\n")[0].split()
        counts = [digits.count(str(d)) for d in range(10)]
        assert counts[int(ex.answer)] == max(counts)
        assert abs(len(ex.prompt) - 300) <= 2


def test_kv_task_answer_is_the_value_of_the_asked_key():
    ex = KVRetrievalTask(prompt_length=200, seed=0).example(3)
    haystack, question = ex.prompt[3:].split("\n")
    pairs = dict(p.split("=") for p in haystack.split(";"))
    assert pairs[question[:-2]] == ex.answer


def test_examples_are_deterministic_and_ranks_read_disjoint_indices():
    assert MajorityDigitTask(100, 7).example(5) == MajorityDigitTask(100, 7).example(5)
    r0, r1 = batch_indices(3, 0, 2, 4), batch_indices(3, 1, 2, 4)
    assert set(r0).isdisjoint(r1) and list(r0) == [24, 25, 26, 27]


def test_file_dataset_reads_jsonl_and_visits_every_row_each_epoch(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": i}) + "\n" for i in range(5)))
    ds = FileDataset(str(path), seed=0)
    assert sorted(ds.example(i).prompt for i in range(5)) == [f"q{i}" for i in range(5)]
    assert ds.example(2).answer == str(int(ds.example(2).prompt[1:]))


def test_missing_dataset_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_source("majority", str(tmp_path / "nope.jsonl"), 100, 0)


def test_dataset_row_without_prompt_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": 1}\n{"answer": 2}\n')
    with pytest.raises(ValueError, match=r"row 1: the prompt is missing"):
        FileDataset(str(path), seed=0)


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="unknown --task 'sudoku'"):
        build_source("sudoku", None, 100, 0)


def test_a_curriculum_doubles_the_prompt_length_in_equal_stages_then_holds_the_final_length():
    c = Curriculum(start=16, final=100, steps=10)
    assert c.stages() == [16, 32, 64, 100]  # the last stage is the final length, not the next power of two
    assert [c.length(s) for s in range(12)] == [16, 16, 16, 32, 32, 64, 64, 64, 100, 100, 100, 100]
    for start, final, steps in [(0, 10, 5), (10, 10, 5), (4, 10, 0)]:
        with pytest.raises(ValueError):
            Curriculum(start, final, steps)


def test_curriculum_prompts_follow_their_step_and_the_warm_up_reads_the_first_stage():
    """Example i belongs to GRPO step i // examples_per_step (batch_indices' numbering, so a resume reads the same
    prompts); the warm-up's examples (from SFT_OFFSET on) are the first stage's."""
    curriculum, per_step = Curriculum(start=16, final=256, steps=10), 8
    source = build_source("needle", None, 256, seed=3, curriculum=curriculum, examples_per_step=per_step)
    plain = {n: NeedleDigitTask(n, 3) for n in curriculum.stages()}
    for step in (0, 3, 4, 9, 10, 50):
        for i in batch_indices(step, 1, 2, 4):
            assert source.example(i) == plain[curriculum.length(step)].example(i)
            assert len(source.example(i).prompt) == curriculum.length(step)
    assert source.example(SFT_OFFSET + 5) == plain[16].example(SFT_OFFSET + 5)
    assert "curriculum 16/32/64/128/256" in source.name


def test_a_curriculum_with_a_dataset_is_refused_by_name(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": 1}\n')
    with pytest.raises(ValueError, match="--curriculum_start_length grows the built-in tasks' prompts"):
        build_source("needle", str(path), 100, 0, curriculum=Curriculum(4, 100, 10))


@pytest.mark.parametrize("start, dataset, prompt_length, expected", [
    (None, None, 256, Curriculum(16, 256, 50)),  # the default for the built-in tasks
    (None, "d.jsonl", 256, None),                # none for a dataset unless asked for
    (None, None, 16, None),                      # prompts no longer than the default start
    (0, None, 256, None),                        # turned off
    (32, None, 256, Curriculum(32, 256, 50)),
])
def test_the_curriculum_options_resolve_to(start, dataset, prompt_length, expected):
    data = DataArguments(prompt_length=prompt_length, dataset=dataset, curriculum_start_length=start)
    assert curriculum_of(data, max_steps=100) == expected


def test_the_warm_up_defaults_to_a_supervised_start_only_when_a_curriculum_runs(monkeypatch):
    """prepare() resolves an unset --sft_warmup_steps: 60 on the curriculum's first prompts, 0 without one."""
    from pg_deepspeed.grpo.args import GRPOArguments, ModelArguments, TrainArguments
    from pg_deepspeed.grpo.setup_checks import prepare

    monkeypatch.setenv("WORLD_SIZE", "1")
    plan = lambda data, **train: prepare(ModelArguments(), data, GRPOArguments(),
                                         TrainArguments(ds_config="ds_configs/zero3_cpu.json", **train))
    assert plan(DataArguments()).train.sft_warmup_steps == 60
    assert plan(DataArguments(curriculum_start_length=0)).train.sft_warmup_steps == 0
    assert plan(DataArguments(curriculum_start_length=0), sft_warmup_steps=7).train.sft_warmup_steps == 7


@pytest.mark.parametrize("start, fraction, message", [
    (300, 0.5, r"--curriculum_start_length 300 \(--prompt_length 256\): a curriculum must start between 1"),
    (16, 1.5, r"--curriculum_fraction must be in \(0, 1\], got 1.5"),
])
def test_bad_curriculum_options_are_named(start, fraction, message):
    with pytest.raises(ValueError, match=message):
        curriculum_of(DataArguments(curriculum_start_length=start, curriculum_fraction=fraction), max_steps=100)


# ---------------------------------------------------------------- rollout: stop, pad and mask at EOS
EOS, PAD = 2, 0
# The next token(s) after each token; two choices are sampled 50/50. Every path ends in EOS except 50 <-> 51.
CHAIN = {
    10: [EOS],                                   # EOS at the first step
    20: [21], 21: [22], 22: [23], 23: [EOS],     # EOS at the fourth step
    30: [31, 40], 31: [EOS],                     # EOS at the second step, or ...
    40: [41], 41: [42], 42: [43], 43: [44], 44: [EOS],   # ... at the sixth
    50: [51], 51: [50],                          # never
}


def markov_chain_lm():
    """A real Llama whose next-token distribution depends only on the current token and follows CHAIN.

    Its layers add nothing to the residual stream (o_proj and down_proj are zero), the embedding of token t is
    the unit vector e_t (vocabulary = hidden size = 64), so the final norm gives 8·e_t and lm_head column t
    holds the logits after t: 8 · 4 = 32 on each allowed next token, 0 elsewhere (any other token: p < 1e-12).
    """
    model = tiny_causal_lm("llama", vocab_size=64, hidden_size=64)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(64))
        model.lm_head.weight.zero_()
        for token, successors in CHAIN.items():
            model.lm_head.weight[successors, token] = 4.0
    return model


def rollout_and_forward_count(model, last_tokens, G, max_new_tokens, seed=0, cache="shared"):
    """Left-padded prompts of different lengths ending in `last_tokens`, decoded through `cache` (the model patched);
    returns (Rollout, forward calls)."""
    patch_model(model)
    prompt_ids = torch.tensor([[0, 0, 0, 5, 7], [0, 7, 8, 9, 6], [0, 0, 0, 0, 0]])[: len(last_tokens)].clone()
    prompt_ids[:, -1] = torch.tensor(last_tokens)
    prompt_mask = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 1]])[: len(last_tokens)]
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        out = generate(
            model, prompt_ids, prompt_mask, G, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
            eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(seed), cache=cache,
        )
    finally:
        hook.remove()
    return out, len(calls)


def chain_path(last_token, sampled, max_new_tokens):
    """The tokens CHAIN allows after `last_token`, taking each 50/50 choice as `sampled` did; stops after EOS."""
    path, token = [], last_token
    while len(path) < max_new_tokens and token != EOS:
        nxt = int(sampled[len(path)])
        assert nxt in CHAIN[token], f"sampled {nxt} after {token}; the chain allows {CHAIN[token]}"
        path.append(nxt)
        token = nxt
    return path


def assert_rows_follow_chain(out, last_tokens, G, max_new_tokens):
    """Each row: its chain path (EOS included) under mask 1, then PAD under mask 0."""
    lengths = []
    for row, (ids, mask) in enumerate(zip(out.completion_ids, out.completion_mask)):
        path = chain_path(last_tokens[row // G], ids, max_new_tokens)
        n = len(path)
        assert ids[:n].tolist() == path, f"row {row}"
        assert mask[:n].eq(1).all() and mask[n:].eq(0).all(), f"row {row}: mask {mask.tolist()}, length {n}"
        assert ids[n:].eq(PAD).all(), f"row {row}: {ids.tolist()} not padded after {n} tokens"
        lengths.append(n)
    return lengths


@pytest.mark.parametrize("cache", ["shared", "repeat"])
def test_rollout_stops_each_row_at_its_eos_and_stops_decoding_when_all_are_done(cache):
    """Rows end at EOS on steps 1, 4 and 2 or 6; EOS is inside the mask, PAD after; no forward after the last EOS."""
    model, last_tokens, G, max_new_tokens = markov_chain_lm(), [10, 20, 30], 4, 16
    out, forwards = rollout_and_forward_count(model, last_tokens, G, max_new_tokens, cache=cache)
    lengths = assert_rows_follow_chain(out, last_tokens, G, max_new_tokens)
    assert lengths[:8] == [1] * 4 + [4] * 4
    assert set(lengths[8:]) == {2, 6}, "seed 0 samples both branches of token 30"  # fixed seed: deterministic
    assert out.completion_ids.shape == (12, 6)          # trimmed to the longest row, not max_new_tokens
    assert forwards == 6                                # the prefill and 5 decode steps: none after the last EOS


@pytest.mark.parametrize("cache", ["shared", "repeat"])
def test_rollout_row_without_eos_runs_to_max_new_tokens_beside_finished_rows(cache):
    """A row that never samples EOS is cut at max_new_tokens with a full mask; the finished rows stay padded."""
    model, last_tokens, G, max_new_tokens = markov_chain_lm(), [10, 50], 2, 5
    out, forwards = rollout_and_forward_count(model, last_tokens, G, max_new_tokens, cache=cache)
    lengths = assert_rows_follow_chain(out, last_tokens, G, max_new_tokens)
    assert lengths == [1, 1, 5, 5]
    assert out.completion_ids[2:].tolist() == [[51, 50, 51, 50, 51]] * 2 and EOS not in out.completion_ids[2:]
    assert forwards == 5                                # the prefill and 4 decode steps: none for a 6th token
