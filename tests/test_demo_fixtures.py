"""The demo's fixtures (pg_deepspeed/demo/): the character tokenizer and the tiny model presets."""
import string

import pytest

from pg_deepspeed.demo.char_tokenizer import build_char_tokenizer
from pg_deepspeed.demo.presets import is_preset, preset_config


def test_char_tokenizer_round_trips_printable_text_without_inserting_spaces():
    tokenizer = build_char_tokenizer()
    text = string.printable.replace("\t", "").replace("\r", "").replace("\x0b", "").replace("\x0c", "") + "\n\n  x"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_char_tokenizer_special_tokens_and_unknown_characters():
    tokenizer = build_char_tokenizer()
    assert [tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token] == [
        "<pad>", "<bos>", "<eos>", "<unk>"]
    assert tokenizer("a\tb<eos>")["input_ids"][1] == tokenizer.unk_token_id
    assert tokenizer("a\tb<eos>")["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(tokenizer("ab<eos>")["input_ids"], skip_special_tokens=True) == "ab"


def test_char_tokenizer_saves_and_reloads(tmp_path):
    from transformers import AutoTokenizer

    build_char_tokenizer().save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).decode(AutoTokenizer.from_pretrained(tmp_path)("1 + 1 =\n2")[
        "input_ids"]) == "1 + 1 =\n2"


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_presets_are_tiny_gqa_models_over_the_char_vocabulary(name):
    config = preset_config(name)
    assert is_preset(name)
    assert config.vocab_size == len(build_char_tokenizer())
    assert config.num_key_value_heads < config.num_attention_heads
    assert 128 <= config.hidden_size <= 256 and config.max_position_embeddings >= 4096


def test_unknown_preset_is_refused_naming_the_presets():
    with pytest.raises(ValueError, match="tiny-qwen2"):
        preset_config("tiny-gpt5")
