"""The GRPO update of a multi-turn rollout sampled as a tree: the loss covers only the tokens the model sampled
(`loss_mask`), observations are context, shared turns are forwarded once, and the loss and gradients equal the
standard forward's (each conversation beside its repeated prompt, unpatched model); per-node advantages."""
import copy

import pytest
import torch

from pg_deepspeed import patch_model
from pg_deepspeed.grpo.advantages import group_advantages, node_advantages
from pg_deepspeed.grpo.args import GRPOArguments, TrainArguments
from pg_deepspeed.grpo.loss import grpo_loss
from pg_deepspeed.grpo.setup_checks import check_multiturn
from pg_deepspeed.grpo.steps import Batch, policy_loss, prefix_tokens_saved
from reference import padded_completion_logprobs, random_tree_batch, tiny_causal_lm


def turn_mask(completion_mask: torch.Tensor, seed: int) -> torch.Tensor:
    """[N, Lc] a loss mask that drops random runs of each completion (the observations between assistant turns)."""
    g = torch.Generator().manual_seed(seed)
    runs = torch.randint(0, 2, completion_mask.shape, generator=g).cumsum(1) % 3 != 0
    return completion_mask * runs.long()


def tree_batch(seed: int, level: str) -> tuple[Batch, list[int]]:
    prompt_ids, prompt_mask, completion_ids, completion_mask, sizes = random_tree_batch(seed, max_depth=3)
    N, Lc = completion_ids.shape
    g = torch.Generator().manual_seed(seed)
    rewards = torch.rand(N, generator=g)
    group = torch.tensor(sizes)
    advantages = (node_advantages(rewards, completion_ids, completion_mask, group) if level == "node"
                  else group_advantages(rewards, group, "dr_grpo"))
    return Batch(prompt_ids, prompt_mask, completion_ids, completion_mask, rewards, advantages,
                 old_logps=-torch.rand(N, Lc, generator=g) * 5, ref_logps=-torch.rand(N, Lc, generator=g) * 5,
                 loss_mask=turn_mask(completion_mask, seed)), sizes


@pytest.mark.parametrize("level", ["sequence", "node"])
@pytest.mark.parametrize("seed", range(4))
def test_a_tree_rollout_s_update_equals_the_standard_forward_over_the_model_s_own_tokens(seed, level):
    reference = tiny_causal_lm("qwen2")
    model = patch_model(copy.deepcopy(reference))
    batch, sizes = tree_batch(seed, level)
    grpo = GRPOArguments(num_generations=sizes[0], beta=0.04, environment="tests:Env", advantage_level=level,
                         temperature=0.7)
    if len(set(sizes)) > 1:  # the trainer's groups are all G; the packing takes any sizes
        grpo.num_generations = sizes  # type: ignore[assignment]
    loss, stats = policy_loss(model, batch, grpo)
    loss.backward()
    logps, _ = padded_completion_logprobs(reference, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                          batch.completion_mask, sizes, temperature=0.7)
    expected, expected_stats = grpo_loss(logps, batch.old_logps, batch.ref_logps, batch.advantages, batch.loss_mask,
                                         beta=0.04)
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())
    assert stats == pytest.approx(expected_stats, rel=1e-5)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert (p.grad - q.grad).norm() <= 1e-4 * q.grad.norm(), name


def test_tokens_outside_the_loss_mask_carry_no_gradient():
    """Observation tokens: their log-probs may change freely, the loss does not see them."""
    batch, sizes = tree_batch(0, "sequence")
    logps = torch.zeros(batch.completion_ids.shape, requires_grad=True)
    loss, _ = grpo_loss(logps, batch.old_logps, None, batch.advantages, batch.trained_mask)
    loss.backward()
    assert bool((logps.grad[batch.loss_mask == 0] == 0).all())
    assert bool((logps.grad[batch.loss_mask == 1] != 0).any())


def test_prefix_tokens_saved_counts_the_shared_turns_of_a_tree():
    """Branching 2,2: two first turns of 5 tokens each shared by two leaves, after a 4-token prompt."""
    g = torch.Generator().manual_seed(0)
    first = [torch.randint(3, 100, (5,), generator=g) for _ in range(2)]
    completions = torch.stack([torch.cat([first[i // 2], torch.randint(3, 100, (3,), generator=g)]) for i in range(4)])
    prompt = torch.randint(3, 100, (1, 4), generator=g)
    batch = Batch(prompt, torch.ones_like(prompt), completions, torch.ones_like(completions), torch.zeros(4),
                  torch.zeros(4))
    train = TrainArguments(ds_config="x", prompts_per_device=1)
    tree = GRPOArguments(num_generations=4, environment="tests:Env")
    flat = GRPOArguments(num_generations=4)
    assert prefix_tokens_saved(batch, flat, train) == 3 * 4  # the prompt's 3 repeats
    assert prefix_tokens_saved(batch, tree, train) == 3 * 4 + 2 * 5  # and each first turn's one repeat


def test_node_advantages_of_a_branching_2_2_tree_by_hand():
    """Leaves (a,a'), (b,b') under first turns a and b; rewards 1, 0, 1, 1. V(root) = 0.75, V(a) = 0.5, V(b) = 1."""
    turn = lambda v: [v] * 2
    completions = torch.tensor([turn(10) + turn(20), turn(10) + turn(21), turn(11) + turn(30), turn(11) + turn(31)])
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    adv = node_advantages(rewards, completions, torch.ones_like(completions), torch.tensor([4]))
    root, a, b = 0.75, 0.5, 1.0
    shared_a, shared_b = (2 * a - 2 * root) / 2 ** 0.5, (2 * b - 2 * root) / 2 ** 0.5
    leaf = lambda r, parent: (r - root) + (r - parent)
    expected = torch.tensor([[shared_a] * 2 + [leaf(1.0, a)] * 2, [shared_a] * 2 + [leaf(0.0, a)] * 2,
                             [shared_b] * 2 + [leaf(1.0, b)] * 2, [shared_b] * 2 + [leaf(1.0, b)] * 2])
    assert torch.allclose(adv, expected, atol=1e-6)


def test_node_advantages_of_a_flat_group_are_twice_the_centred_reward():
    completions = torch.tensor([[5, 6, 0], [7, 8, 9], [9, 9, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0]])
    rewards = torch.tensor([0.0, 1.0, 0.5])
    adv = node_advantages(rewards, completions, mask, torch.tensor([3]))
    assert torch.allclose(adv, 2 * (rewards - 0.5)[:, None] * mask, atol=1e-6)


ENV = dict(environment="m:C", max_completion_tokens=64)


@pytest.mark.parametrize("options, message", [
    (dict(branching="2,2,2", num_generations=4), r"--branching 2,2,2 samples 8 conversations per prompt but "
                                                 r"--num_generations is 4"),
    (dict(branching="2,2", num_generations=4), r"--branching 2,2 branches at turn boundaries: it needs --environment"),
    (dict(branching="2,x", num_generations=4, **ENV), r"--branching '2,x': expected positive integers"),
    (dict(branching="2,0", num_generations=0, **ENV), r"--branching '2,0': expected positive integers"),
    (dict(branching="2,2,2", num_generations=8, max_turns=2, **ENV), r"has 3 levels but --max_turns is 2"),
    (dict(max_turns=0, **ENV), r"--max_turns must be >= 1"),
    (dict(environment="m:C"), r"--environment needs --max_completion_tokens"),
    (dict(max_completion_tokens=64), r"--max_completion_tokens bounds a multi-turn conversation: it needs "
                                     r"--environment"),
    (dict(ENV, max_completion_tokens=2, max_new_tokens=4),
     r"--max_completion_tokens 2 is below --max_new_tokens 4"),
    (dict(advantage_level="turn"), r"--advantage_level must be one of"),
    (dict(advantage_level="node", no_prefix_grouping=True), r"--advantage_level node .* --no_prefix_grouping"),
])
def test_multi_turn_options_that_disagree_are_refused_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        check_multiturn(GRPOArguments(**options), TrainArguments(ds_config="x"))


def test_branching_that_agrees_with_g_gives_the_conversations_limits():
    limits = check_multiturn(GRPOArguments(branching="2,2,2", num_generations=8, max_new_tokens=16, **ENV),
                             TrainArguments(ds_config="x"))
    assert limits.branching == (2, 2, 2) and limits.group_size == 8 and limits.max_completion_tokens == 64
    assert check_multiturn(GRPOArguments(branching="8", num_generations=8), TrainArguments(ds_config="x")) is None
