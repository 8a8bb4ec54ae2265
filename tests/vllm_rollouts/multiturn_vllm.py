"""A multi-turn rollout sampled by the colocated vLLM engine (one process, world size 1), run by
tests/vllm_rollouts/test_vllm_multiturn.py; writes --out/result.json.

    python tests/vllm_rollouts/multiturn_vllm.py --model models/smollm2-135m-instruct --out DIR

SmolLM2-135M-Instruct (float32) is the policy; its weights are streamed into an eager vLLM engine (which starts from
dummy weights), which samples two turns with --branching 2 for two prompts. The script records each row's
conversation, masks, the engine's log-probs and the trainer's (completion_logprobs over the whole row)."""
import argparse
import json
import os
import sys
from types import SimpleNamespace

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.update({"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from pg_deepspeed import patch_model  # noqa: E402
from pg_deepspeed.distributed.parallel_dims import ParallelDims  # noqa: E402
from pg_deepspeed.grpo.args import GRPOArguments, ModelArguments, TrainArguments  # noqa: E402
from pg_deepspeed.grpo.chat_turns import ChatTurns  # noqa: E402
from pg_deepspeed.grpo.data import Example  # noqa: E402
from pg_deepspeed.grpo.environments import with_environment  # noqa: E402
from pg_deepspeed.grpo.multiturn import MultiTurnOptions, multiturn_rollout  # noqa: E402
from pg_deepspeed.grpo.prompts import PromptFormat  # noqa: E402
from pg_deepspeed.grpo.vllm_rollout import VLLMRollout  # noqa: E402
from pg_deepspeed.models.logprobs import completion_logprobs  # noqa: E402


class AddThree:
    def reset(self, example):
        return [{"role": "user", "content": f"{example['prompt']} Answer with a number only."}]

    def step(self, messages):
        return [{"role": "tool", "content": "Now add 3 to it. Answer with a number only."}], 1.0, False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--port", default="29611")
    args = parser.parse_args()
    os.environ["MASTER_PORT"] = args.port
    dist.init_process_group("gloo")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    policy = patch_model(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)).eval()
    options = MultiTurnOptions(2, (2,), 16)
    grpo = GRPOArguments(num_generations=2, max_new_tokens=16, temperature=1.0, rollout_engine="vllm",
                         vllm_enforce_eager=True, vllm_gpu_memory_utilization=0.1)
    setup = SimpleNamespace(grpo=grpo, model_args=ModelArguments(model=args.model, dtype="float32"),
                            config=AutoConfig.from_pretrained(args.model), max_length=1024,
                            train=TrainArguments(ds_config="-", seed=0))
    vllm = VLLMRollout.start(setup, torch.device("cpu"))
    examples = [Example("What is 2+3?", "5"), Example("What is 4+4?", "8")]
    batch = multiturn_rollout(policy, ChatTurns(PromptFormat(tokenizer)), AddThree, examples, with_environment(None),
                              options, grpo, ParallelDims(1), torch.device("cpu"), torch.Generator().manual_seed(0),
                              seed=11, vllm=vllm)
    with torch.no_grad():
        trainer = completion_logprobs(policy, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                      batch.completion_mask, options.group_size, temperature=grpo.temperature)
    result = {"completion_ids": batch.completion_ids.tolist(), "completion_mask": batch.completion_mask.tolist(),
              "loss_mask": batch.loss_mask.tolist(), "rollout_logps": batch.rollout_logps.tolist(),
              "trainer_logps": trainer.tolist(), "samples": batch.samples, "metrics": batch.rollout_metrics}
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # vLLM's engine teardown at exit is not what this checks
