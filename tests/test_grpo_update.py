"""The GRPO update and rollout on a real tiny model, in one process, and token-mean on two launcher ranks."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pg_deepspeed import patch_model
from pg_deepspeed.grpo.advantages import group_advantages
from pg_deepspeed.grpo.args import GRPOArguments
from pg_deepspeed.generation.sampling import generate
from pg_deepspeed.grpo.steps import Batch, policy_loss, shared_preamble
from pg_deepspeed.demo.presets import preset_config
from conftest import run_deepspeed


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return patch_model(AutoModelForCausalLM.from_config(preset_config("tiny-qwen2"), dtype=torch.float32))


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


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "dr_grpo"])
def test_first_update_same_with_and_without_prefix_grouping(model, aggregation):
    """A/B: the grouped and the standard forward give the same loss and gradients (float32)."""
    batch = random_batch()
    kw = dict(num_generations=4, beta=0.04, loss_aggregation=aggregation, max_new_tokens=7)
    loss_a, stats_a, grads_a = loss_and_grads(model, batch, GRPOArguments(**kw))
    loss_b, stats_b, grads_b = loss_and_grads(model, batch, GRPOArguments(**kw, no_prefix_grouping=True))
    assert abs(loss_a - loss_b) <= 1e-5 * abs(loss_b)
    assert stats_a["clip_frac"] == stats_b["clip_frac"]
    worst = max(((grads_a[n] - grads_b[n]).norm() / grads_b[n].norm()).item() for n in grads_b)
    assert worst <= 1e-4


def test_a_preamble_shared_by_the_micro_batch_is_used_and_changes_nothing(model):
    """Prompts that all begin with one system prompt: the trainer shares it once (three levels), same update."""
    batch = random_batch(B=3, Lp=40)
    preamble = torch.randint(4, 100, (24,), generator=torch.Generator().manual_seed(7))
    ids, mask = torch.zeros(3, 64, dtype=torch.long), torch.zeros(3, 64, dtype=torch.long)
    for row in range(3):  # left-padded: preamble + the row's own prompt at the right end
        prompt = torch.cat([preamble, batch.prompt_ids[row][batch.prompt_mask[row] == 1]])
        ids[row, 64 - len(prompt):], mask[row, 64 - len(prompt):] = prompt, 1
    batch.prompt_ids, batch.prompt_mask = ids, mask
    kw = dict(num_generations=4, beta=0.04, max_new_tokens=7)
    shared = GRPOArguments(**kw, min_shared_preamble=16)
    assert shared_preamble(batch, shared) >= 24
    assert shared_preamble(batch, GRPOArguments(**kw, min_shared_preamble=0)) == 0
    loss_a, _, grads_a = loss_and_grads(model, batch, shared)
    loss_b, _, grads_b = loss_and_grads(model, batch, GRPOArguments(**kw, no_prefix_grouping=True))
    assert abs(loss_a - loss_b) <= 1e-5 * abs(loss_b)
    assert max(((grads_a[n] - grads_b[n]).norm() / grads_b[n].norm()).item() for n in grads_b) <= 1e-4


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
