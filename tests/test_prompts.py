"""Prompts as the model sees them (pg_deepspeed/grpo/prompts.py) and local datasets of strings or conversations
(pg_deepspeed/grpo/data.py FileDataset): the chat template's own rendering, the system prompt, and every bad row
refused naming its index."""
import json

import datasets
import pytest

from pg_deepspeed.demo.char_tokenizer import build_char_tokenizer
from pg_deepspeed.grpo.data import FileDataset, longest_prompt
from pg_deepspeed.grpo.prompts import PromptFormat, check_prompt

# a ChatML-like template over the character vocabulary (the tiny presets' tokenizer has no template of its own)
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+5="}]


def chat_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_a_conversation_is_the_templates_own_rendering_with_the_generation_prompt():
    tokenizer = chat_tokenizer()
    fmt = PromptFormat(tokenizer)
    assert fmt.text(CONVERSATION) == "<bos><|system|>\nBe brief.\n<|user|>\n2+5=\n<|assistant|>\n"
    assert fmt.token_ids(CONVERSATION) == tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True,
                                                                        tokenize=True, return_dict=False)


def test_a_plain_prompt_becomes_one_user_message_unless_the_template_is_turned_off():
    tokenizer = chat_tokenizer()
    assert PromptFormat(tokenizer).text("2+5=") == "<bos><|user|>\n2+5=\n<|assistant|>\n"
    plain = PromptFormat(tokenizer, use_chat_template=False)
    assert plain.text("2+5=") == "2+5=" and plain.token_ids("2+5=") == [tokenizer.bos_token_id, *tokenizer("2+5=")[
        "input_ids"]]


def test_the_system_prompt_replaces_the_conversations_or_comes_first():
    fmt = PromptFormat(chat_tokenizer(), system_prompt="Answer with a number.")
    replaced = fmt.conversation(CONVERSATION)
    assert replaced == [{"role": "system", "content": "Answer with a number."}, CONVERSATION[1]]
    assert fmt.conversation("2+5=") == [{"role": "system", "content": "Answer with a number."},
                                        {"role": "user", "content": "2+5="}]
    assert CONVERSATION[0]["content"] == "Be brief."  # the dataset's row is not modified


def test_what_cannot_be_rendered_is_refused():
    with pytest.raises(ValueError, match="--system_prompt needs a chat template"):
        PromptFormat(build_char_tokenizer(), system_prompt="x")
    with pytest.raises(ValueError, match="--system_prompt cannot be used with --no_chat_template"):
        PromptFormat(chat_tokenizer(), system_prompt="x", use_chat_template=False)
    with pytest.raises(ValueError, match="a conversation needs a chat template"):
        PromptFormat(build_char_tokenizer()).token_ids(CONVERSATION)
    with pytest.raises(ValueError, match="cannot be rendered with --no_chat_template"):
        PromptFormat(chat_tokenizer(), use_chat_template=False).token_ids(CONVERSATION)


@pytest.mark.parametrize("prompt, problem", [
    (None, "the prompt is missing"),
    ("  ", "the prompt is empty"),
    (7, "the prompt is a int, not a string or a list of messages"),
    ([], "the prompt is an empty list of messages"),
    (["hi"], "message 0 is not a {'role': ..., 'content': ...} mapping"),
    ([{"role": "user"}], "message 0 is not a {'role': ..., 'content': ...} mapping"),
    ([{"role": "robot", "content": "hi"}], "message 0 has role 'robot'"),
    ([{"role": "user", "content": ""}], "message 0 (user) has no text content"),
    ([{"role": "system", "content": "s"}], "the conversation has no user message"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "ends with an assistant message"),
])
def test_a_malformed_prompt_is_described(prompt, problem):
    assert problem in check_prompt(prompt)


def test_good_prompts_pass():
    assert check_prompt("2+5=") is None and check_prompt(CONVERSATION) is None
    assert check_prompt([*CONVERSATION, {"role": "assistant", "content": "7"}, {"role": "user", "content": "x2?"}]) is None


def rows():
    return [{"prompt": CONVERSATION, "answer": "7", "level": 1},
            {"prompt": [{"role": "user", "content": "3+3="}], "answer": "6", "level": 2}]


@pytest.mark.parametrize("form", ["jsonl", "parquet", "save_to_disk", "data_folder"])
def test_a_local_dataset_of_conversations_opens_in_every_form(tmp_path, form):
    data = datasets.Dataset.from_list(rows())
    if form == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    elif form == "parquet":
        path = tmp_path / "d.parquet"
        data.to_parquet(str(path))
    elif form == "save_to_disk":
        path = tmp_path / "saved"
        data.save_to_disk(str(path))
    else:
        path = tmp_path / "folder"
        path.mkdir()
        data.to_json(str(path / "train.jsonl"))
    ds = FileDataset(str(path), seed=0)
    assert sorted((ex.answer, ex.prompt[-1]["content"]) for ex in (ds.example(0), ds.example(1))) == [
        ("6", "3+3="), ("7", "2+5=")]


def test_the_answer_column_is_named_by_option_and_a_missing_one_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "2+5=", "solution": "7"}) + "\n")
    assert FileDataset(str(path), seed=0, answer_column="solution").example(0).answer == "7"
    with pytest.raises(ValueError, match=r"has no 'result' column \(--answer_column\)"):
        FileDataset(str(path), seed=0, answer_column="result")


def test_a_malformed_row_is_refused_naming_its_index(tmp_path):
    path = tmp_path / "d.jsonl"
    bad = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in (CONVERSATION, bad)))
    with pytest.raises(ValueError, match=r"row 1: the conversation ends with an assistant message"):
        FileDataset(str(path), seed=0)


def test_rows_mixing_strings_and_conversations_are_each_read_as_written(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "2+5=", "answer": "7"}) + "\n"
                    + json.dumps({"prompt": CONVERSATION, "answer": "7"}) + "\n")
    ds = FileDataset(str(path), seed=0)
    assert sorted(ds.prompts, key=str) == sorted(["2+5=", CONVERSATION], key=str)


def test_an_unreadable_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "2+5=", "answer": "7"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="datasets cannot read it") as error:
        FileDataset(str(path), seed=0)
    assert "\n" not in str(error.value)


def test_the_longest_prompt_is_measured_as_rendered_and_an_unrenderable_row_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    ds = FileDataset(str(path), seed=0)
    fmt = PromptFormat(chat_tokenizer())
    assert longest_prompt(fmt, ds) == (len(fmt.token_ids(CONVERSATION)), 0)
    with pytest.raises(ValueError, match=r"row 0: a conversation needs a chat template"):
        longest_prompt(PromptFormat(build_char_tokenizer()), ds)
