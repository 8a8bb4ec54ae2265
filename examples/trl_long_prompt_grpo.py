"""Long-prompt GRPO with TRL, each prompt computed once per group instead of G times.

Stock TRL script -> this one is a one-line change (marked below): import PrefixGroupedGRPOTrainer instead of
trl.GRPOTrainer. Everything else (GRPOConfig, rewards, accelerate / DeepSpeed configs, PEFT) stays as it is.

    # a local model directory and a local JSON-lines dataset with a "prompt" column
    python examples/trl_long_prompt_grpo.py --model_dir ./my-model --dataset ./prompts.jsonl --output_dir out \
        --num_generations 8 --max_completion_length 128 --per_device_train_batch_size 8 --max_steps 100
    # several processes (DDP) or ZeRO-3: the usual accelerate launch
    accelerate launch --num_processes 8 examples/trl_long_prompt_grpo.py --model_dir ... --deepspeed ds.json
    # offline smoke run on CPU: writes a tiny random model and 2048-character prompts into --output_dir first
    python examples/trl_long_prompt_grpo.py --demo --output_dir /tmp/trl_demo --use_cpu --bf16 false \
        --max_steps 2 --num_generations 4 --per_device_train_batch_size 4 --max_completion_length 16
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser
from trl import GRPOConfig

from pg_deepspeed.integrations.trl import PrefixGroupedGRPOTrainer  # the one change: was `from trl import GRPOTrainer`


@dataclass
class ScriptArguments:
    model_dir: str = field(default="", metadata={"help": "local model directory (weights and tokenizer)"})
    dataset: str = field(default="", metadata={"help": "local JSON-lines file with a 'prompt' column"})
    demo: bool = field(default=False, metadata={"help": "build a tiny random model and long prompts offline"})


def write_demo(out: Path, prompts: int = 16, prompt_chars: int = 2048) -> tuple[str, str]:
    """A tiny random Qwen2 with the char tokenizer and `prompts` random prompts, saved under `out`."""
    from pg_deepspeed.demo.presets import preset_config
    from pg_deepspeed.demo.char_tokenizer import build_char_tokenizer

    torch.manual_seed(0)
    model_dir, data = out / "demo_model", out / "demo_prompts.jsonl"
    AutoModelForCausalLM.from_config(preset_config("tiny-qwen2")).save_pretrained(model_dir)
    build_char_tokenizer().save_pretrained(model_dir)
    letters = torch.randint(0, 26, (prompts, prompt_chars)).tolist()
    Dataset.from_dict({"prompt": ["".join(chr(97 + c) for c in row) for row in letters]}).to_json(data)
    return str(model_dir), str(data)


def reward_vowels(completions, **kwargs):
    """A toy reward (replace with yours): the share of vowels in the completion."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def main() -> None:
    script, config = HfArgumentParser((ScriptArguments, GRPOConfig)).parse_args_into_dataclasses()
    if script.demo:
        script.model_dir, script.dataset = write_demo(Path(config.output_dir))
    if not script.model_dir or not script.dataset:
        raise SystemExit("pass --model_dir and --dataset (or --demo)")

    tokenizer = AutoTokenizer.from_pretrained(script.model_dir)
    tokenizer.padding_side = "left"  # TRL's prompts are left-padded
    trainer = PrefixGroupedGRPOTrainer(
        model=script.model_dir,
        reward_funcs=reward_vowels,
        args=config,
        train_dataset=load_dataset("json", data_files=script.dataset, split="train"),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(config.output_dir)


if __name__ == "__main__":
    main()
