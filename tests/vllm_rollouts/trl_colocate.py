"""Three `train()` steps of a TRL GRPO trainer with `use_vllm=True, vllm_mode="colocate"` on CPU, in one process
(vLLM's state is per process: tests/vllm_rollouts/test_vllm_trl.py runs this as a script).

    python tests/vllm_rollouts/trl_colocate.py OUT_DIR [stock]

Writes OUT_DIR/result.json: TRL's logged rows, the largest weight change. With `stock`, trl.GRPOTrainer itself."""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: reference.py

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from pg_deepspeed.demo.char_tokenizer import VOCAB_SIZE, build_char_tokenizer  # noqa: E402
from pg_deepspeed.integrations.trl import PrefixGroupedGRPOTrainer  # noqa: E402
from reference import tiny_causal_lm  # noqa: E402


def prompts(n: int = 16, seed: int = 0) -> Dataset:
    """n prompts of 80-120 letters (long against the completions, of different lengths)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(80, 121, (n,), generator=g).tolist()
    return Dataset.from_dict(
        {"prompt": ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (k,), generator=g)) for k in lengths]})


def reward(completions, **kwargs):
    return [c.count("a") + c.count("e") + len(c) / 10 for c in completions]


def main(out: Path, stock: bool) -> None:
    model_dir = out / "model"
    # head dim 32 (64 / 2 heads): the smallest vLLM's CPU attention serves
    model = tiny_causal_lm("qwen2", vocab_size=VOCAB_SIZE, num_attention_heads=2, num_key_value_heads=1)
    model.config.architectures = ["Qwen2ForCausalLM"]
    model.save_pretrained(model_dir)
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(model_dir)
    tokenizer.padding_side = "left"
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    args = GRPOConfig(
        output_dir=str(out / "trainer"), per_device_train_batch_size=8, num_generations=4,
        gradient_accumulation_steps=2, max_completion_length=5, max_steps=3, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
        seed=0, use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1, vllm_max_model_length=160,
        vllm_enable_sleep_mode=False,
    )
    cls = GRPOTrainer if stock else PrefixGroupedGRPOTrainer
    trainer = cls(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=prompts(),
                  processing_class=tokenizer)
    trainer.train()
    moved = max((p.detach() - initial[n]).abs().max().item() for n, p in trainer.model.named_parameters())
    (out / "result.json").write_text(json.dumps({"log_history": trainer.state.log_history, "moved": moved}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), stock=len(sys.argv) > 2 and sys.argv[2] == "stock")
    sys.stdout.flush()
    os._exit(0)  # vLLM's exit-time shutdown of the in-process engine is not ours to wait for
