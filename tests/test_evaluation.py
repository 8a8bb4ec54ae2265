"""Held-out evaluation (pg_deepspeed/grpo/evaluation.py): the held-out rows are never trained on, and greedy pass@1 is
what stock transformers' greedy decoding scores."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pg_deepspeed import patch_model
from pg_deepspeed.demo.char_tokenizer import build_char_tokenizer
from pg_deepspeed.demo.presets import preset_config
from pg_deepspeed.distributed.parallel_dims import ParallelDims
from pg_deepspeed.grpo.args import DataArguments, GRPOArguments, TrainArguments
from pg_deepspeed.grpo.data import FileDataset, NeedleDigitTask
from pg_deepspeed.grpo.evaluation import EVAL_OFFSET, EvalSet, evaluate, held_out
from pg_deepspeed.grpo.prompts import PromptFormat
from pg_deepspeed.grpo.data import Example
from pg_deepspeed.grpo.rewards import resolve_rewards


def jsonl(path, n: int):
    path.write_text("".join(json.dumps({"prompt": f"q{i}=", "answer": i}) + "\n" for i in range(n)))
    return str(path)


def test_rows_held_out_of_a_dataset_are_never_read_by_training(tmp_path):
    source = FileDataset(jsonl(tmp_path / "d.jsonl", 20), seed=3)
    train, evaluation = held_out(DataArguments(dataset="x", eval_examples=5), source, seed=3)
    held = {e.prompt for e in evaluation.examples}
    trained = {train.example(i).prompt for i in range(200)}  # ten epochs of the training shuffle
    assert len(held) == 5 and len(trained) == 15 and held.isdisjoint(trained)
    again = held_out(DataArguments(dataset="x", eval_examples=5), FileDataset(source.path, seed=3), seed=3)[1]
    assert [e.prompt for e in again.examples] == [e.prompt for e in evaluation.examples]  # a resume holds out the same


def test_an_eval_dataset_is_read_whole_or_its_first_rows(tmp_path):
    data = DataArguments(eval_dataset=jsonl(tmp_path / "e.jsonl", 6))
    assert [e.prompt for e in held_out(data, None, seed=0)[1].examples] == [f"q{i}=" for i in range(6)]
    data.eval_examples = 4
    assert [e.prompt for e in held_out(data, None, seed=0)[1].examples] == [f"q{i}=" for i in range(4)]


def test_a_built_in_task_is_evaluated_on_indices_no_step_reads():
    task = NeedleDigitTask(64, seed=0)
    _, evaluation = held_out(DataArguments(eval_examples=3), task, seed=0)
    assert [e.prompt for e in evaluation.examples] == [task.example(EVAL_OFFSET + i).prompt for i in range(3)]


@pytest.mark.parametrize("eval_batch", [0, 5])
def test_greedy_accuracy_is_the_share_stock_greedy_decoding_gets_right(eval_batch):
    """Half the answers are what stock `generate(do_sample=False)` decodes from an unpatched copy, half are not: the
    evaluation's greedy accuracy must be exactly 0.5, over an odd number of examples per call (a short last call),
    whether it decodes --prompts_per_device (3) or --per_device_eval_batch_size (5) prompts at once."""
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(preset_config("tiny-qwen2")).eval()
    model = patch_model(copy.deepcopy(reference))
    prompts = [f"{a}+{b}=" for a in range(4) for b in range(2)]
    grpo = GRPOArguments(max_new_tokens=5, num_generations=2, rollout_prefill_chunk=0)
    train = TrainArguments(ds_config="-", prompts_per_device=3, per_device_eval_batch_size=eval_batch)
    answers = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt)["input_ids"]]])
        out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=5, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        greedy = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        answers.append(greedy if i % 2 == 0 else greedy + "#")
    eval_set = EvalSet("test", [Example(p, a) for p, a in zip(prompts, answers)])
    rewards = resolve_rewards(["exact_match"], None, synthetic=False, format_reward=0.0)
    result = evaluate(model, PromptFormat(tokenizer), eval_set, rewards, grpo, train, ParallelDims(1), rank=0,
                      device=torch.device("cpu"), step=0)
    assert result["eval/accuracy"] == 0.5
    assert result["eval/reward/exact_match"] == 0.5  # each function's greedy mean, here the same share
    assert 0.0 <= result["eval/reward_mean"] <= 1.0
    assert not model.training or reference.training is model.training  # the mode is restored
