"""Multi-turn rollouts (`--environment`, issue 24): assistant turns and environment observations alternate, each
group sampled as a tree.

Per micro-batch of B examples: each example's environment is reset once (its messages are the group's prompt), then
up to `max_turns` turns run; turn t samples `branching[t]` continuations (1 past the last level) of every live
conversation of every group in **one** sampling call (the built-in engine or vLLM, through `steps.sample`), and each
continuation is a conversation of its own with its own copy of the environment. After its turn each conversation
is stepped: it ends at `done`, at `max_turns`, when its turn was cut (no end-of-turn token: `max_new_tokens` or the
budget), or when the observation would not leave a token of `max_completion_tokens`; otherwise the observation and
the next assistant header are appended as the chat template renders them (chat_turns.py: token for token, or
refused). Every rank makes the same number of sampling calls (ZeRO-3's gathers are collectives): the turn loop runs
while any rank has a live conversation, and a rank with none joins with an idle call.

The G = prod(branching) leaves of a group are its G rows, in tree order; rows that share turns share their tokens
exactly (copied from the common parent). A conversation that ends before the last branching level stands for every
leaf below it: its row is repeated prod(branching[turns:]) times.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
import torch.distributed as dist

from pg_deepspeed.collectives import any_rank
from pg_deepspeed.distributed.parallel_dims import ParallelDims
from pg_deepspeed.grpo.args import GRPOArguments, TrainArguments
from pg_deepspeed.grpo.chat_turns import ChatTurns
from pg_deepspeed.grpo.data import Example, PromptSource, batch_indices
from pg_deepspeed.grpo.environments import ENVIRONMENT_REWARD, checked_reset, checked_step
from pg_deepspeed.grpo.preemption import PreemptionGuard
from pg_deepspeed.grpo.rewards import RewardFunctions
from pg_deepspeed.grpo.steps import Batch, advantages_of, gathered_once, sample
from pg_deepspeed.grpo.vllm_rollout import VLLMRollout


def parse_branching(value: str | int | Sequence[int]) -> tuple[int, ...]:
    """`--branching` ("2,2,2", "8", 8 or [2, 2, 2]) as a tuple of positive ints; ValueError naming the option."""
    items = value.replace(" ", "").split(",") if isinstance(value, str) else [value] if isinstance(value, int) \
        else list(value)
    try:
        levels = tuple(int(k) for k in items)
    except (TypeError, ValueError):
        raise ValueError(f"--branching {value!r}: expected positive integers such as 2,2,2") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"--branching {value!r}: expected positive integers such as 2,2,2")
    return levels


@dataclass(frozen=True)
class MultiTurnOptions:
    """The conversation's limits. max_turns: assistant turns at most (--max_turns); branching: continuations sampled
    of each turn, level by level (--branching; G = their product); max_new_tokens: tokens of one assistant turn
    (--max_new_tokens); max_completion_tokens: tokens after the prompt in all, turns, observations and template text
    (--max_completion_tokens; None: no total beyond the turns')."""

    max_turns: int
    branching: tuple[int, ...]
    max_new_tokens: int
    max_completion_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"--max_turns must be >= 1, got {self.max_turns}")
        object.__setattr__(self, "branching", parse_branching(self.branching))
        if len(self.branching) > self.max_turns:
            raise ValueError(f"--branching has {len(self.branching)} levels but --max_turns is {self.max_turns}: a "
                             "level past the last turn would never be sampled")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_completion_tokens is not None and self.max_completion_tokens < self.max_new_tokens:
            raise ValueError(f"--max_completion_tokens {self.max_completion_tokens} is below --max_new_tokens "
                             f"{self.max_new_tokens}: the first turn alone could not fit; raise it or lower "
                             "--max_new_tokens")

    @property
    def group_size(self) -> int:
        """G: the leaves of a group's tree."""
        return math.prod(self.branching)

    def fanout(self, turn: int) -> int:
        """Continuations sampled of each live conversation at `turn` (0-based)."""
        return self.branching[turn] if turn < len(self.branching) else 1

    def leaves_below(self, turns: int) -> int:
        """Rows a conversation ended after `turns` turns stands for."""
        return math.prod(self.branching[turns:])


@dataclass
class Conversation:
    """One node of a group's tree: the conversation after its last turn (and, while live, its next observation)."""

    group: int
    path: tuple[int, ...]
    env: Any
    messages: list[dict]
    ids: list[int] = field(default_factory=list)       # every token after the prompt
    sampled: list[int] = field(default_factory=list)   # 1 where the model sampled the token
    logps: list[float] = field(default_factory=list)   # the sampler's log-prob of sampled tokens (vLLM), else 0
    reward: float | None = None
    turns: int = 0
    tool_calls: int = 0
    ended: str | None = None  # done, max_turns, truncated, budget

    def branch(self, j: int, copy_env: bool) -> "Conversation":
        return Conversation(self.group, (*self.path, j), copy.deepcopy(self.env) if copy_env else self.env,
                            [dict(m) for m in self.messages], list(self.ids), list(self.sampled), list(self.logps),
                            self.reward, self.turns, self.tool_calls)

    def name(self, turn: int) -> str:
        branch = ".".join(map(str, self.path))
        return f"conversation {self.group}/{branch} (prompt {self.group} of this rank, branch {branch}), turn {turn}"


def example_row(example: Example) -> dict:
    """What `reset` gets: the dataset row (`prompt`, `answer` and its other columns)."""
    return {**example.columns, "prompt": example.prompt, "answer": example.answer}


def left_padded(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask) [R, max len], left-padded."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def right_padded(rows: Sequence[Sequence[float]], pad: float, dtype: torch.dtype, device: torch.device
                 ) -> torch.Tensor:
    """Lists -> [R, max(1, max len)], right-padded with `pad`."""
    out = torch.full((len(rows), max(1, max(len(r) for r in rows))), pad, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.tensor(r, dtype=dtype)
    return out.to(device)


def agree_in_sequence_group(results: list, dims: ParallelDims, policy) -> list:
    """Under sequence parallelism every rank of a group is one replica: the environment results of the group's first
    rank, on all of them (an environment need not be deterministic). Identity otherwise."""
    if dims.sp == 1 or not dist.is_initialized():
        return results
    group = policy.get_sequence_parallel_group()
    holder = [results]
    dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0), group=group)
    return holder[0]


def multiturn_rollout(policy, turns: ChatTurns, environment: type, examples: Sequence[Example],
                      rewards: RewardFunctions, options: MultiTurnOptions, grpo: GRPOArguments, dims: ParallelDims,
                      device: torch.device, generator: torch.Generator, seed: int,
                      guard: PreemptionGuard | None = None, vllm: VLLMRollout | None = None) -> Batch:
    """The B = len(examples) groups' conversations as a Batch of N = B·G rows (G = options.group_size, which
    --num_generations must equal):

    prompt_ids/prompt_mask [B, Lp] left-padded: each environment's first messages rendered with the generation
    prompt; completion_ids [N, Lc] right-padded (pad id): every token after the prompt; completion_mask [N, Lc]: 1 on
    each of them; loss_mask [N, Lc]: 1 on the tokens the model sampled (its end-of-turn token included); rewards [N]:
    `rewards` (made by environments.with_environment) of each conversation, the environment's reward in its
    `environment` column, the others scoring the last assistant message; advantages: steps.advantages_of over each
    group's G rows ([N], or [N, Lc] with --advantage_level node); rollout_logps [N, Lc] (vLLM, temperature > 0): the engine's log-probs at sampled tokens, 0
    elsewhere; samples: per row the prompt, the rest as text, the messages, rewards, turns, tool calls and why it
    ended; rollout_metrics: this rank's turns_mean and tool_calls_mean. Collective (one sampling call per turn on
    every rank)."""
    G = options.group_size
    if grpo.num_generations != G:
        raise ValueError(f"--num_generations {grpo.num_generations} differs from the product of --branching "
                         f"{','.join(map(str, options.branching))} ({G}): the G leaves of a group are its rows")
    if grpo.max_new_tokens != options.max_new_tokens:
        raise ValueError(f"--max_new_tokens {grpo.max_new_tokens} and the rollout's {options.max_new_tokens} differ")
    if ENVIRONMENT_REWARD not in rewards.names:
        raise ValueError("the rewards of a multi-turn rollout need the environment's: build them with "
                         "environments.with_environment")
    prompts, groups, first = [], [], []
    for b, example in enumerate(examples):
        env = environment()
        messages = turns.first_messages(checked_reset(env, example_row(example), f"conversation {b}, reset"))
        prompts.append(turns.prompt_ids(messages))
        first.append(messages)
        groups.append([Conversation(b, (), env, [dict(m) for m in messages])])
    with gathered_once(policy, grpo, vllm) as inner:  # the weights gathered once for all turns, not once per turn
        cache_bytes, with_logps = turn_loop(policy, turns, groups, prompts, options, inner, dims, device, generator,
                                            seed, guard, vllm)
    return assemble(groups, prompts, first, examples, turns, rewards, options, grpo, device, cache_bytes, with_logps)


def turn_loop(policy, turns: ChatTurns, groups: list[list[Conversation]], prompts: list[list[int]],
              options: MultiTurnOptions, grpo: GRPOArguments, dims: ParallelDims, device: torch.device,
              generator: torch.Generator, seed: int, guard: PreemptionGuard | None, vllm: VLLMRollout | None
              ) -> tuple[int, bool]:
    """Up to max_turns turns over the groups' live conversations (each group's list replaced by its leaves so far,
    in tree order); returns (the decode cache's largest K/V bytes, whether the sampler returned log-probs).
    Collective: one sampling call per turn while any rank has a live conversation."""
    tokenizer, budget = turns.tokenizer, options.max_completion_tokens
    cache_bytes, with_logps = 0, False
    for turn in range(options.max_turns):
        live = [c for group in groups for c in group if c.ended is None]
        if not any_rank(bool(live)):
            break
        k = options.fanout(turn)
        ids, mask = left_padded([prompts[c.group] + c.ids for c in live] or [prompts[0]], tokenizer.pad_token_id,
                                device)  # no live conversation: an idle call, its result dropped
        turn_seed = seed if turn == 0 else hash((seed, turn)) % 2**63
        out = sample(policy, ids, mask, k, grpo, tokenizer, generator, grpo.temperature, dims, guard, vllm=vllm,
                     seed=turn_seed)
        cache_bytes = max(cache_bytes, out.cache_bytes)
        if not live:
            continue
        with_logps = out.logprobs is not None
        lengths = out.completion_mask.sum(1).tolist()
        children, turns_taken = {}, []
        for i, parent in enumerate(live):
            kids = [parent.branch(j, copy_env=k > 1) for j in range(k)]
            children[id(parent)] = kids
            for j, child in enumerate(kids):
                r, n = i * k + j, int(lengths[i * k + j])
                logps = out.logprobs[r, :n].tolist() if with_logps else [0.0] * n
                closed = take_turn(child, out.completion_ids[r, :n].tolist(), logps, turns, budget, turn + 1)
                turns_taken.append((child, closed))
        results = agree_in_sequence_group([checked_step(child.env, child.messages, child.name(turn + 1))
                                           for child, _ in turns_taken], dims, policy)
        for (child, closed), (observations, reward, done) in zip(turns_taken, results):
            after_step(child, closed, observations, reward, done, turns, prompts[child.group], options)
        for group in groups:
            group[:] = [kid for c in group for kid in children.get(id(c), [c])]
    return cache_bytes, with_logps


def take_turn(child: Conversation, sampled: list[int], logps: list[float], turns: ChatTurns, budget: int | None,
              turn: int) -> str | None:
    """Add the model's sampled turn (cut to the budget) to `child`; returns how it closed: None when the model
    ended the turn, "truncated" (max_new_tokens) or "budget" (max_completion_tokens) when it was cut."""
    cut = None
    if budget is not None and len(child.ids) + len(sampled) > budget:
        keep = budget - len(child.ids)
        sampled, logps, cut = sampled[:keep], logps[:keep], "budget"
    child.ids += sampled
    child.sampled += [1] * len(sampled)
    child.logps += logps
    message, ended = turns.assistant_message(sampled)
    child.messages.append(message)
    child.turns = turn
    return None if ended else cut or "truncated"


def after_step(child: Conversation, closed: str | None, observations: list[dict], reward: float | None, done: bool,
               turns: ChatTurns, prompt: list[int], options: MultiTurnOptions) -> None:
    """The environment's answer to `child`'s turn: its reward, then the end of the conversation or the observation
    and the next assistant header appended (TemplateBreakError when the template does not continue it)."""
    if reward is not None:
        child.reward = reward
    child.tool_calls += sum(m["role"] == "tool" for m in observations)
    if done:
        child.ended = "done"
    elif closed is not None:
        child.ended = closed
    elif child.turns >= options.max_turns:
        child.ended = "max_turns"
    else:
        where = child.name(child.turns)
        shown = turns.observations(observations, where)
        new = turns.continuation(prompt + child.ids, child.messages + shown, where)
        budget = options.max_completion_tokens
        if budget is not None and len(child.ids) + len(new) >= budget:
            child.ended = "budget"  # no room for a token of the next turn: the observation is not shown
            return
        child.messages += shown
        child.ids += new
        child.sampled += [0] * len(new)
        child.logps += [0.0] * len(new)


def assemble(groups: list[list[Conversation]], prompts: list[list[int]], first: list[list[dict]],
             examples: Sequence[Example], turns: ChatTurns, rewards: RewardFunctions, options: MultiTurnOptions,
             grpo: GRPOArguments, device: torch.device, cache_bytes: int, with_logps: bool) -> Batch:
    """The groups' leaves as the Batch's rows (a conversation ended early repeated for the leaves below it)."""
    rows = [c for group in groups for c in group for _ in range(options.leaves_below(c.turns))]
    G, B = options.group_size, len(groups)
    counts = [sum(options.leaves_below(c.turns) for c in group) for group in groups]
    assert counts == [G] * B, f"the groups have {counts} leaves, not {G} each"
    prompt_ids, prompt_mask = left_padded(prompts, turns.tokenizer.pad_token_id, device)
    completion_ids = right_padded([c.ids for c in rows], turns.tokenizer.pad_token_id, torch.long, device)
    completion_mask = right_padded([[1] * len(c.ids) for c in rows], 0, torch.long, device)
    loss_mask = right_padded([c.sampled for c in rows], 0, torch.long, device)
    shown = [turns.render(m) for m in first]
    last = [next(m["content"] for m in reversed(c.messages) if m["role"] == "assistant") for c in rows]
    env_rewards = [0.0 if c.reward is None else c.reward for c in rows]
    columns = {name: [examples[c.group].columns.get(name) for c in rows] for name in examples[0].columns}
    total, parts = rewards.score([shown[c.group] for c in rows], last, [examples[c.group].answer for c in rows],
                                 {**columns, ENVIRONMENT_REWARD: env_rewards})
    reward = torch.tensor(total, dtype=torch.float32, device=device)
    sizes = torch.full((B,), G, dtype=torch.long, device=device)
    samples = [{"prompt": shown[c.group], "completion": turns.decode(c.ids), "messages": c.messages, "reward": r,
                **{f"reward/{name}": part[n] for name, part in zip(rewards.names, parts)},
                "turns": c.turns, "tool_calls": c.tool_calls, "ended": c.ended}
               for n, (c, r) in enumerate(zip(rows, total))]
    return Batch(prompt_ids, prompt_mask, completion_ids, completion_mask, reward,
                 advantages_of(reward, completion_ids, completion_mask, sizes, grpo), cache_bytes=cache_bytes,
                 samples=samples,
                 reward_parts=torch.tensor(parts, dtype=torch.float64, device=device).T.contiguous(),
                 rollout_logps=right_padded([c.logps for c in rows], 0.0, torch.float32, device) if with_logps
                 else None,
                 loss_mask=loss_mask,
                 rollout_metrics={"turns_mean": sum(c.turns for c in rows) / len(rows),
                                  "tool_calls_mean": sum(c.tool_calls for c in rows) / len(rows)})


@dataclass(frozen=True)
class Conversations:
    """What a multi-turn run (--environment) rolls out with: the environment class, the template rule, the limits."""

    environment: type
    turns: ChatTurns
    options: MultiTurnOptions

    def score(self, policy, examples: Sequence[Example], rewards: RewardFunctions, grpo: GRPOArguments,
              temperature: float, dims: ParallelDims, device: torch.device, generator: torch.Generator, seed: int,
              vllm: VLLMRollout | None = None) -> tuple[list[float], list[list[float]]]:
        """One unbranched conversation per example at `temperature` (0: greedy), as the held-out evaluation scores
        them -> (weighted rewards [n], each function's [K][n]). Collective, like multiturn_rollout."""
        batch = multiturn_rollout(policy, self.turns, self.environment, examples, rewards,
                                  replace(self.options, branching=(1,)),
                                  replace(grpo, num_generations=1, temperature=temperature, advantage_level="sequence"),
                                  dims, device, generator, seed, vllm=vllm)
        return batch.rewards.tolist(), batch.reward_parts.T.tolist()


def rollout_conversations(policy, turns: ChatTurns, environment: type, source: PromptSource,
                          rewards: RewardFunctions, options: MultiTurnOptions, grpo: GRPOArguments,
                          train: TrainArguments, step: int, dims: ParallelDims, rank: int, device: torch.device,
                          guard: PreemptionGuard | None = None, vllm: VLLMRollout | None = None) -> Batch:
    """steps.rollout's counterpart for --environment: this replica's examples of `step` (as steps.rollout picks them,
    seeded alike) rolled out by :func:`multiturn_rollout`."""
    per_rank = train.prompts_per_device * train.gradient_accumulation_steps
    replica = dims.replica(rank)
    examples = [source.example(i) for i in batch_indices(step, replica, dims.dp, per_rank)]
    seed = hash((train.seed, step, replica)) % 2**63
    return multiturn_rollout(policy, turns, environment, examples, rewards, options, grpo, dims, device,
                             torch.Generator().manual_seed(seed), seed, guard, vllm)
