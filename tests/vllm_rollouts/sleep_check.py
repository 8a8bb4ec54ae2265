"""One engine through a step's cycle with vLLM's sleep mode (run by test_vllm_sleep.py in its own process: vLLM's
distributed state is one per process): sample, sleep (level 2), wake the weights, sync every weight, wake the KV cache,
sample again; prints one JSON line: the bytes the sleep freed and |trainer - vLLM| log-prob differences before and
after. `--no-sleep` runs the same cycle without sleeping (what a CPU can check of this script).

    python tests/vllm_rollouts/sleep_check.py [--no-sleep]
"""
import argparse
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from pg_deepspeed.demo.presets import preset_config
from pg_deepspeed.generation.vllm_engine import VLLMEngine, vllm_model_dir
from pg_deepspeed.models.logprobs import completion_logprobs
from pg_deepspeed.models.patch import patch_model

G = 4


def sync(engine: VLLMEngine, model) -> None:
    with engine.weight_update() as load:
        load((name, param.data) for name, param in model.named_parameters())


def logprob_diff(engine: VLLMEngine, model, config, device) -> float:
    """Max |trainer - vLLM| over the completion tokens of two prompts' G samples each."""
    ids = torch.randint(4, 90, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    out = engine.generate(ids, mask, G, max_new_tokens=6, temperature=1.0, top_p=1.0, eos_id=None,
                          pad_id=config.pad_token_id, seed=3)
    trainer = completion_logprobs(model, ids.to(device), mask.to(device), out.completion_ids.to(device),
                                  out.completion_mask.to(device), G)
    return float(((trainer.cpu() - out.logprobs.cpu()).abs() * out.completion_mask.cpu()).max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-sleep", action="store_true")
    args = parser.parse_args()
    sleep = not args.no_sleep
    device = torch.device("cuda" if sleep else "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "VLLM_CPU_KVCACHE_SPACE": "1"})
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    config = preset_config("tiny-qwen2")
    torch.manual_seed(0)
    model = patch_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)).eval()
    engine = VLLMEngine(vllm_model_dir(config, "tiny-qwen2"), dtype="float32", max_model_len=256,
                        gpu_memory_utilization=0.3, enforce_eager=True, sleep=sleep)
    sync(engine, model)
    before = logprob_diff(engine, model, config, device)
    freed = engine.sleep() if sleep else 0
    if sleep:
        engine.wake_up(["weights"])
    sync(engine, model)
    if sleep:
        engine.wake_up(["kv_cache"])
    after = logprob_diff(engine, model, config, device)
    print("SLEEP_CHECK " + json.dumps({"freed_bytes": freed, "diff_before": before, "diff_after": after}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
