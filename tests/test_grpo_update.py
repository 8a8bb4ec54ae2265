"""The GRPO update and rollout on a real tiny model, in one process, and token-mean on two launcher ranks.

The update's loss and gradients are compared with the same GRPO loss over the standard forward: tests/reference.py's
padded batch (each prompt repeated beside its completions) through the unpatched model.
"""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pg_deepspeed import patch_model
from pg_deepspeed.grpo.advantages import group_advantages
from pg_deepspeed.grpo.args import GRPOArguments
from pg_deepspeed.grpo.loss import grpo_loss
from pg_deepspeed.generation.sampling import generate
from pg_deepspeed.grpo.steps import Batch, policy_loss, shared_preamble
from pg_deepspeed.demo.presets import preset_config
from conftest import run_deepspeed
from reference import padded_completion_logprobs

TEMPERATURE = 0.7  # not 1, so that the log-probs' temperature is checked too


@pytest.fixture(scope="module")
def reference():
    """The tiny preset, unpatched."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(preset_config("tiny-qwen2"), dtype=torch.float32)


@pytest.fixture(scope="module")
def model(reference):
    return patch_model(copy.deepcopy(reference))


def random_batch(G=4, B=3, Lp=40, Lc=7, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    vocab = preset_config("tiny-qwen2").vocab_size
    prompt_lens = torch.randint(5, Lp + 1, (B,), generator=g)
    prompt_mask = (torch.arange(Lp) >= Lp - prompt_lens[:, None]).long()
    completion_lens = torch.randint(1, Lc + 1, (B * G,), generator=g)
    completion_mask = (torch.arange(Lc) < completion_lens[:, None]).long()
    rewards = torch.rand(B * G, generator=g)
    return Batch(
        torch.randint(4, vocab, (B, Lp), generator=g) * prompt_mask, prompt_mask,
        torch.randint(4, vocab, (B * G, Lc), generator=g) * completion_mask, completion_mask,
        rewards, group_advantages(rewards, torch.full((B,), G), "grpo"),
        old_logps=-torch.rand(B * G, Lc, generator=g) * 5, ref_logps=-torch.rand(B * G, Lc, generator=g) * 5,
    )


def loss_and_grads(model, batch, grpo):
    model.zero_grad()
    loss, stats = policy_loss(model, batch, grpo)
    loss.backward()
    return loss.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters()}


def standard_loss_and_grads(reference, batch, grpo):
    """The same GRPO loss over the standard forward: the padded batch through the unpatched model."""
    reference.zero_grad()
    logps, _ = padded_completion_logprobs(reference, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                          batch.completion_mask, grpo.num_generations, temperature=grpo.temperature)
    loss, stats = grpo_loss(
        logps, batch.old_logps, batch.ref_logps, batch.advantages, batch.completion_mask, epsilon=grpo.epsilon,
        epsilon_high=grpo.epsilon_high, beta=grpo.beta, aggregation=grpo.loss_aggregation,
        max_completion_length=grpo.max_new_tokens,
    )
    loss.backward()
    return loss.detach(), stats, {n: p.grad.clone() for n, p in reference.named_parameters()}


def worst_grad_error(grads, expected) -> float:
    assert grads.keys() == expected.keys()
    return max(((grads[n] - expected[n]).norm() / expected[n].norm()).item() for n in expected)


@pytest.mark.parametrize("prefix_grouping", [True, False])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "dr_grpo"])
def test_first_update_equals_the_standard_forwards_loss_and_gradients(model, reference, aggregation, prefix_grouping):
    """Prefix-grouped and `--no_prefix_grouping` alike: loss within 1e-5, every gradient within 1e-4 (float32)."""
    batch = random_batch()
    grpo = GRPOArguments(num_generations=4, beta=0.04, loss_aggregation=aggregation, max_new_tokens=7,
                         temperature=TEMPERATURE, no_prefix_grouping=not prefix_grouping)
    loss, stats, grads = loss_and_grads(model, batch, grpo)
    expected_loss, expected_stats, expected_grads = standard_loss_and_grads(reference, batch, grpo)
    assert abs(loss - expected_loss) <= 1e-5 * abs(expected_loss)
    assert stats["clip_frac"] == expected_stats["clip_frac"]
    assert worst_grad_error(grads, expected_grads) <= 1e-4


def test_a_preamble_shared_by_the_micro_batch_is_used_and_changes_nothing(model, reference):
    """Prompts that all begin with one system prompt: the trainer shares it once (three levels); the loss and
    gradients are the standard forward's (1e-5, 1e-4)."""
    batch = random_batch(B=3, Lp=40)
    preamble = torch.randint(4, 100, (24,), generator=torch.Generator().manual_seed(7))
    ids, mask = torch.zeros(3, 64, dtype=torch.long), torch.zeros(3, 64, dtype=torch.long)
    for row in range(3):  # left-padded: preamble + the row's own prompt at the right end
        prompt = torch.cat([preamble, batch.prompt_ids[row][batch.prompt_mask[row] == 1]])
        ids[row, 64 - len(prompt):], mask[row, 64 - len(prompt):] = prompt, 1
    batch.prompt_ids, batch.prompt_mask = ids, mask
    kw = dict(num_generations=4, beta=0.04, max_new_tokens=7, temperature=TEMPERATURE)
    shared = GRPOArguments(**kw, min_shared_preamble=16)
    assert shared_preamble(batch, shared) >= 24
    assert shared_preamble(batch, GRPOArguments(**kw, min_shared_preamble=0)) == 0
    loss, _, grads = loss_and_grads(model, batch, shared)
    expected_loss, _, expected_grads = standard_loss_and_grads(reference, batch, shared)
    assert abs(loss - expected_loss) <= 1e-5 * abs(expected_loss)
    assert worst_grad_error(grads, expected_grads) <= 1e-4


@pytest.mark.parametrize("cache", ["shared", "repeat"])
def test_prefix_once_rollout_matches_hf_generate_greedy(model, cache):
    """The prefill once + either decode cache (the prompt held once, or repeated to the G samples) decodes what HF
    generate decodes on repeated prompts."""
    batch = random_batch(G=3, B=2, Lp=30)
    G = 3
    tiny_top_p = 1e-9  # nucleus of one token: greedy
    out = generate(
        model, batch.prompt_ids, batch.prompt_mask, G, max_new_tokens=6, temperature=1.0, top_p=tiny_top_p,
        eos_id=-1, pad_id=0, generator=torch.Generator().manual_seed(0), cache=cache,
    )
    hf = model.generate(
        input_ids=batch.prompt_ids.repeat_interleave(G, 0), attention_mask=batch.prompt_mask.repeat_interleave(G, 0),
        max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
    )
    assert torch.equal(out.completion_ids, hf[:, batch.prompt_ids.shape[1]:])
    assert out.completion_mask.all()


@pytest.mark.distributed
def test_token_mean_is_the_mean_over_every_completion_token_of_the_optimizer_step(tmp_path):
    """Two ranks × two micro-batches of different completion lengths, one ZeRO-3 step through `update`, equal one
    token-mean over all of them (DAPO, TRL's dapo), not a mean of per-micro-batch means.

    It also proves gradient accumulation under ZeRO-3: a pass that skips the engine's forward bookkeeping
    keeps only the last micro-batch's gradient (relative error 0.94 here before completion_logprobs did it)."""
    run = run_deepspeed("tests/dist/token_mean.py", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout[-4000:]
    result = json.loads((tmp_path / "token_mean.json").read_text())
    assert result["step_mean_error"] <= 1e-5
    assert result["mean_of_means_error"] >= 0.05  # the data tells the two aggregations apart


def test_token_weights_scale_each_tokens_policy_term_and_its_gradient_not_the_kl():
    """Truncated importance sampling's weights (--rollout_importance_correction): w_t multiplies token t's clipped
    policy term, value and gradient, as a constant; the KL term is not weighted."""
    torch.manual_seed(0)
    logps = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    old, ref = logps.detach() + 0.05 * torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    advantages, mask = torch.randn(4, dtype=torch.float64), torch.ones(4, 5, dtype=torch.long)
    weights = torch.rand(4, 5, dtype=torch.float64, requires_grad=True)

    def loss(w, beta=0.0):
        return grpo_loss(logps, old, ref, advantages, mask, beta=beta, token_weights=w)[0]

    one = loss(None)
    assert torch.equal(loss(torch.ones(4, 5, dtype=torch.float64)), one)
    assert torch.allclose(loss(torch.full((4, 5), 0.5, dtype=torch.float64)), 0.5 * one)
    (grad,) = torch.autograd.grad(loss(weights), logps)
    (plain,) = torch.autograd.grad(grpo_loss(logps, old, ref, advantages, mask, aggregation="token-mean",
                                             token_count=1.0)[0], logps)
    assert torch.allclose(grad, plain * weights.detach() / mask.sum())
    assert torch.autograd.grad(loss(weights), weights, allow_unused=True) == (None,)  # constants
    delta = ref - logps.detach()
    kl = (torch.exp(delta) - delta - 1).mean()
    assert torch.allclose(loss(torch.zeros(4, 5, dtype=torch.float64), beta=0.1), 0.1 * kl)  # the KL unweighted
