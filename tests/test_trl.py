"""PrefixGroupedGRPOTrainer against stock trl.GRPOTrainer: real train() runs on tiny local models, CPU, offline.

The stock trainer is the reference: with one seed both trainers generate the same completions (generation is TRL's
own in both), so every logged loss and the final weights must agree; only the grouped trainer's forwards are packed.
The regrouping itself is checked against the naive padded reference (tests/reference.py) on shuffled partial groups.
"""
from __future__ import annotations

import warnings

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is the optional extra: pip install -e '.[trl]'")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import pg_deepspeed  # noqa: E402
from pg_deepspeed.integrations.trl import (  # noqa: E402
    PrefixGroupedGRPOTrainer, check_trl_version, group_rows_by_prompt, grouped_logprobs,
)
from pg_deepspeed.demo.char_tokenizer import EOS_ID, VOCAB_SIZE, build_char_tokenizer  # noqa: E402
from reference import padded_completion_logprobs, tiny_causal_lm  # noqa: E402


# ---------------------------------------------------------------------------------------------- unit: regrouping
def test_groups_are_found_by_prompt_tokens_under_the_mask_whatever_the_padding_holds():
    # rows 0, 2, 5: "7 8 9" (different junk under the padding); rows 1, 4: "8 9" (a suffix of it); row 3: "5 8 9"
    ids = torch.tensor([[3, 7, 8, 9], [7, 1, 8, 9], [0, 7, 8, 9], [4, 5, 8, 9], [9, 9, 8, 9], [6, 7, 8, 9]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    groups = group_rows_by_prompt(ids, mask)
    assert groups.order.tolist() == [0, 2, 5, 1, 4, 3]
    assert groups.sizes == [3, 2, 1] and groups.first.tolist() == [0, 1, 3]
    assert groups.chunks(None) == [(0, 3)]
    assert groups.chunks(4) == [(0, 1), (1, 3)]  # whole groups, at most 4 rows unless one group is larger
    assert groups.chunks(2) == [(0, 1), (1, 2), (2, 3)]


def _shuffled_trl_batch(seed: int):
    """A TRL-shaped batch [N, Lp + Lc]: left-padded prompts repeated per row, partial groups (3, 1, 2, 1 rows, two
    groups with one prompt), one all-masked completion row (truncation masking), rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens, sizes, Lp, Lc = [9, 3, 9, 6], [3, 1, 2, 1], 11, 5
    prompts = [torch.randint(4, VOCAB_SIZE, (n,), generator=g) for n in prompt_lens]
    prompts[2] = prompts[0]  # the same prompt in two groups: they are one group of 5
    rows, completion_ids, completion_mask = [], [], []
    for prompt, size in zip(prompts, sizes):
        for _ in range(size):
            rows.append(torch.cat([torch.randint(4, VOCAB_SIZE, (Lp - len(prompt),), generator=g), prompt]))
            length = int(torch.randint(1, Lc + 1, (1,), generator=g))
            completion_ids.append(torch.randint(4, VOCAB_SIZE, (Lc,), generator=g))
            completion_mask.append((torch.arange(Lc) < length).long())
    completion_mask[4] = torch.zeros(Lc, dtype=torch.long)
    prompt_ids = torch.stack(rows)
    row_lens = torch.tensor([len(p) for p, size in zip(prompts, sizes) for _ in range(size)])
    prompt_mask = (torch.arange(Lp) >= Lp - row_lens[:, None]).long()
    perm = torch.randperm(len(rows), generator=g)
    ids = torch.cat([prompt_ids, torch.stack(completion_ids)], 1)
    mask = torch.cat([prompt_mask, torch.stack(completion_mask)], 1)
    return ids, mask, Lc, perm


@pytest.mark.parametrize("max_rows", [None, 2])
def test_shuffled_partial_groups_return_the_padded_reference_in_trl_row_order(max_rows):
    model = tiny_causal_lm("qwen2", vocab_size=VOCAB_SIZE).double()
    reference = tiny_causal_lm("qwen2", vocab_size=VOCAB_SIZE).double()
    pg_deepspeed.patch_model(model)
    ids, mask, Lc, perm = _shuffled_trl_batch(seed=3)
    # the reference: every row as its own padded `[prompt ; completion]` (one "group" per row), in consecutive order
    want_logps, want_ent = padded_completion_logprobs(
        reference, ids[:, :-Lc], mask[:, :-Lc], ids[:, -Lc:], mask[:, -Lc:], 1, temperature=0.7
    )
    got_logps, got_ent = grouped_logprobs(
        model, ids[perm], mask[perm], Lc, temperature=0.7, return_entropy=True, max_rows=max_rows
    )
    torch.testing.assert_close(got_logps, want_logps[perm], rtol=0, atol=2e-6)
    torch.testing.assert_close(got_ent, want_ent[perm], rtol=0, atol=2e-6)
    assert (got_logps[mask[perm][:, -Lc:] == 0] == 0).all()
    # and the consecutive batch gives the same rows, permuted back
    consecutive, _ = grouped_logprobs(model, ids, mask, Lc, temperature=0.7, return_entropy=False)
    torch.testing.assert_close(got_logps, consecutive[perm], rtol=0, atol=2e-6)


def test_gradients_flow_back_to_the_rows_trl_handed_over():
    model = tiny_causal_lm("qwen2", vocab_size=VOCAB_SIZE).double()
    reference = tiny_causal_lm("qwen2", vocab_size=VOCAB_SIZE).double()
    pg_deepspeed.patch_model(model)
    ids, mask, Lc, perm = _shuffled_trl_batch(seed=4)
    weights = torch.randn(len(perm), Lc, generator=torch.Generator().manual_seed(0))
    want_logps, want_ent = padded_completion_logprobs(
        reference, ids[:, :-Lc], mask[:, :-Lc], ids[:, -Lc:], mask[:, -Lc:], 1
    )
    (want_logps[perm] * weights + want_ent[perm]).sum().backward()
    logps, ent = grouped_logprobs(model, ids[perm], mask[perm], Lc, temperature=1.0, return_entropy=True)
    (logps * weights + ent).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=name)


def test_an_unsupported_trl_version_is_refused_naming_both_versions():
    check_trl_version("1.16.0")
    check_trl_version("1.16.3")
    for found in ("1.15.2", "1.17.0", "2.0.0"):
        with pytest.raises(RuntimeError, match=rf"trl>=1\.16\.0,<1\.17.*trl {found} is installed"):
            check_trl_version(found)


# ---------------------------------------------------------------------------------------------- train() runs
PROMPTS = 16


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    """A tiny random Qwen2 and the char tokenizer saved in a local directory (TRL builds the reference from it)."""
    path = tmp_path_factory.mktemp("tiny_qwen2")
    tiny_causal_lm("qwen2", vocab_size=VOCAB_SIZE).save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    return str(path)


def _long_prompts(seed: int = 0) -> Dataset:
    """PROMPTS prompts of 80-120 letters: long against the 3-6 token completions, of different lengths (padding)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(80, 121, (PROMPTS,), generator=g).tolist()
    return Dataset.from_dict(
        {"prompt": ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (n,), generator=g)) for n in lengths]}
    )


def _reward(completions, **kwargs):
    return [c.count("a") + c.count("e") + len(c) / 10 for c in completions]


def _train(trainer_cls, path, tmp_path, peft_config=None, **overrides):
    """Run trainer_cls.train(); return (every micro-batch loss, tokens embedded with grad enabled, final weights,
    every micro-batch's inputs, the class of the model the loss saw: the wrapper when there is one)."""
    tokenizer = build_char_tokenizer()
    tokenizer.padding_side = "left"
    settings = dict(
        per_device_train_batch_size=8, num_generations=4, gradient_accumulation_steps=2, max_completion_length=5,
        max_steps=3, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", entropy_coef=0.01,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False, seed=0,
        generation_kwargs={"sequence_bias": {(EOS_ID,): 3.0}},  # some completions end, some are truncated
    )
    args = GRPOConfig(output_dir=str(tmp_path / trainer_cls.__name__), **{**settings, **overrides})
    trainer = trainer_cls(model=path, reward_funcs=_reward, args=args, train_dataset=_long_prompts(),
                          processing_class=tokenizer, peft_config=peft_config)
    losses, tokens, batches = [], [0], []
    compute_loss = trainer.compute_loss

    wrappers = set()

    def recorded_loss(model, inputs, *args, **kwargs):
        wrappers.add(type(model).__name__)
        loss = compute_loss(model, inputs, *args, **kwargs)
        losses.append(loss.item())
        batches.append(inputs)
        return loss

    def count_tokens(module, inputs, output):
        if torch.is_grad_enabled():
            tokens[0] += inputs[0].numel()

    trainer.compute_loss = recorded_loss  # observes the loss of every micro-batch; TRL's own method computes it
    trainer.model.get_input_embeddings().register_forward_hook(count_tokens)
    trainer.train()
    params = dict(trainer.model.named_parameters())
    if any(hasattr(p, "ds_id") for p in params.values()):  # ZeRO-3 partitions: gather the full weights
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            weights = {name: p.detach().clone() for name, p in params.items()}
    else:
        weights = {name: p.detach().clone() for name, p in params.items()}
    return losses, tokens[0], weights, batches, sorted(wrappers)


def _assert_same_run(stock, grouped, initial_path=None, rel=1e-4):
    (stock_losses, _, stock_weights, *_), (losses, _, weights, *_) = stock, grouped
    assert len(losses) == len(stock_losses) > 0
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(stock_losses), rtol=rel, atol=1e-6)
    for name, w in weights.items():
        torch.testing.assert_close(w, stock_weights[name], rtol=0, atol=1e-4, msg=name)


def test_three_steps_match_stock_trl_with_far_fewer_tokens_in_gradient_forwards(local_model, tmp_path):
    # gradient_accumulation_steps=2 -> steps_per_generation=2: TRL shuffles 4 groups of 4 rows and cuts them in two
    # micro-batches of 8, so every loss pass sees partial groups in shuffled order (a positional regrouping fails)
    stock = _train(GRPOTrainer, local_model, tmp_path)
    grouped = _train(PrefixGroupedGRPOTrainer, local_model, tmp_path)
    _assert_same_run(stock, grouped)
    assert any(abs(x) > 1e-3 for x in stock[0])  # the entropy bonus makes every loss non-trivial
    initial = tiny_causal_lm("qwen2", vocab_size=VOCAB_SIZE).state_dict()
    moved = max((grouped[2][n] - initial[n]).abs().max().item() for n in grouped[2])
    assert moved > 1e-2, "the run must change the weights for the comparison to mean anything"
    # tokens at the embedding in the loss passes: stock embeds every padded row [prompt | completion]; grouped embeds
    # each distinct prompt of a micro-batch once plus every completion, without padding
    stock_tokens = sum(b["prompt_ids"].numel() + b["completion_ids"].numel() for b in stock[3])
    grouped_tokens = 0
    for b in grouped[3]:
        prompts = {tuple(ids[m.bool()].tolist()) for ids, m in zip(b["prompt_ids"], b["prompt_mask"])}
        grouped_tokens += sum(map(len, prompts)) + int(b["completion_mask"].sum())
    assert (stock[1], grouped[1]) == (stock_tokens, grouped_tokens)
    # TRL's shuffle leaves about 2 of a group's 4 rows in each micro-batch here, so a prompt is embedded ~2x, not 4x
    assert grouped[1] < 0.5 * stock[1], (grouped[1], stock[1])


def test_old_policy_reference_and_truncation_masking_match_stock_step_by_step(local_model, tmp_path):
    # steps_per_generation=2, num_iterations=2: old log-probs are computed (batch_size chunks); beta>0: the reference
    # model's pass; mask_truncated_completions: all-zero completion rows reach every pass; gradient checkpointing on
    settings = dict(num_iterations=2, beta=0.1, mask_truncated_completions=True, max_steps=2,
                    gradient_checkpointing=True, entropy_coef=0.0)
    stock = _train(GRPOTrainer, local_model, tmp_path, **settings)
    grouped = _train(PrefixGroupedGRPOTrainer, local_model, tmp_path, **settings)
    assert len(grouped[0]) == 4
    _assert_same_run(stock, grouped)
    assert any(abs(x) > 1e-4 for x in stock[0][2:]), "the second iteration's ratios and the KL must move the loss"


LOSS_TYPES = [
    ("grpo", {}), ("dr_grpo", {}), ("bnpo", {}), ("cispo", {}), ("sapo", {}),
    ("luspo", {"importance_sampling_level": "sequence"}), ("vespo", {}),
]


@pytest.mark.parametrize("loss_type, extra", LOSS_TYPES, ids=[name for name, _ in LOSS_TYPES])
def test_each_loss_type_matches_stock(local_model, tmp_path, loss_type, extra):
    # ("dapo", the default, is the test above.) num_iterations=2 so the importance ratios are not all 1.
    settings = dict(loss_type=loss_type, num_iterations=2, max_steps=2, gradient_accumulation_steps=1,
                    per_device_train_batch_size=8, **extra)
    stock = _train(GRPOTrainer, local_model, tmp_path, **settings)
    grouped = _train(PrefixGroupedGRPOTrainer, local_model, tmp_path, **settings)
    _assert_same_run(stock, grouped)


def test_lora_top_entropy_quantile_and_temperature_match_stock(local_model, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    settings = dict(beta=0.1, top_entropy_quantile=0.5, temperature=0.7, max_steps=2, learning_rate=0.5)
    stock = _train(GRPOTrainer, local_model, tmp_path, peft_config=lora, **settings)
    grouped = _train(PrefixGroupedGRPOTrainer, local_model, tmp_path, peft_config=lora, **settings)
    _assert_same_run(stock, grouped)


def test_moe_load_balancing_loss_falls_back_to_trl_with_one_warning(tmp_path):
    path = tmp_path / "tiny_moe"
    # the config has output_router_logits (False) and router_aux_loss_coef 0.001, so TRL asks for the aux loss
    tiny_causal_lm("qwen3_moe", vocab_size=VOCAB_SIZE).save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    settings = dict(max_steps=1, beta=0.1)
    stock = _train(GRPOTrainer, str(path), tmp_path, **settings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grouped = _train(PrefixGroupedGRPOTrainer, str(path), tmp_path, **settings)
    named = [w for w in caught if "compute_aux_loss" in str(w.message) and "cannot be prefix-grouped" in str(w.message)]
    assert len(named) == 1, [str(w.message) for w in caught]
    _assert_same_run(stock, grouped)


@pytest.mark.distributed
@pytest.mark.parametrize("wrapper", ["ddp", "zero3"])
def test_two_processes_with_a_group_split_across_them_match_stock(local_model, tmp_path, wrapper):
    from conftest import run_deepspeed

    run = run_deepspeed("tests/dist/trl_two_ranks.py", "--model", local_model, "--out", str(tmp_path),
                        *(["--zero3"] if wrapper == "zero3" else []))
    assert run.returncode == 0, run.stdout[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for rank in ranks:
        stock, grouped = rank["GRPOTrainer"], rank["PrefixGroupedGRPOTrainer"]
        assert grouped["prompts"] == stock["prompts"]
        expected = {"ddp": "DistributedDataParallel", "zero3": "DeepSpeedEngine"}[wrapper]
        assert grouped["wrapper"] == stock["wrapper"] == [expected]
        _assert_same_run(tuple(stock[k] for k in ("losses", "tokens", "weights")),
                         tuple(grouped[k] for k in ("losses", "tokens", "weights")))
    # the gradients were averaged over the ranks (DDP; ZeRO-3 gathers one copy): both ranks hold the same weights
    for name, w in ranks[0]["PrefixGroupedGRPOTrainer"]["weights"].items():
        torch.testing.assert_close(w, ranks[1]["PrefixGroupedGRPOTrainer"]["weights"][name], rtol=0, atol=0, msg=name)
    # in every step one prompt had rows on both ranks, fewer than 4 on each
    steps = (ranks[0]["PrefixGroupedGRPOTrainer"]["prompts"], ranks[1]["PrefixGroupedGRPOTrainer"]["prompts"])
    for step0, step1 in zip(*steps):
        shared = set(step0) & set(step1)
        assert shared and all(step0.count(p) < 4 and step1.count(p) < 4 for p in shared)
