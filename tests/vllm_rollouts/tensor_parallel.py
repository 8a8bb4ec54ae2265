"""Two ranks sample through colocated vLLM engines of tensor parallel size --tp (1: an engine per rank; 2: one
engine over both ranks), run by tests/vllm_rollouts/test_vllm_tensor_parallel.py through the deepspeed launcher;
each rank writes --out/rank{R}.json.

    deepspeed --num_gpus 2 tests/vllm_rollouts/tensor_parallel.py --tp 2 --out DIR

A tiny Qwen2 (float32, tied embeddings, 4 query and 2 key/value heads) is built with the same seed on both ranks and
streamed into the engine. The ranks hold different numbers of prompts of different lengths: rank 0 three, rank 1
one; then a second call in which rank 1 holds none. Each rank records its completions, the engine's log-probs, their
largest difference from the trainer's log-probs of the same tokens (completion_logprobs on the rank's own prompts),
the query and key/value heads the engine's first attention layer holds on this rank (its shard), and the shared
memory names the engine removed once its ranks had mapped them."""
import argparse
import json
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from pg_deepspeed.demo.presets import preset_config  # noqa: E402
from pg_deepspeed.generation.vllm_engine import VLLMEngine, vllm_model_dir  # noqa: E402
from pg_deepspeed.models.logprobs import completion_logprobs  # noqa: E402
from pg_deepspeed.models.patch import patch_model  # noqa: E402

G = 3


def rank_prompts(rank: int, call: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's prompts for call `call`, left-padded: rank 0 three (lengths 30, 45, 60), rank 1 one of 50 in the
    first call and none in the second."""
    lengths = [30, 45, 60] if rank == 0 else ([50] if call == 0 else [])
    generator = torch.Generator().manual_seed(100 * rank + call)
    width = max(lengths, default=1)
    ids, mask = torch.zeros(len(lengths), width, dtype=torch.long), torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(4, 90, (n,), generator=generator)
        mask[b, width - n:] = 1
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher's
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = preset_config("tiny-qwen2")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = patch_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32)).eval()
    directory = [vllm_model_dir(config, "tiny-qwen2") if rank == 0 else None]
    dist.broadcast_object_list(directory, 0)
    engine = VLLMEngine(directory[0], dtype="float32", max_model_len=128, gpu_memory_utilization=0.1,
                        tensor_parallel_size=args.tp, enforce_eager=True)
    with engine.weight_update() as load:
        for name, param in model.named_parameters():
            load([(name, param.data)])
    attention = engine.model().model.layers[0].self_attn
    calls = []
    for call in range(2):
        ids, mask = rank_prompts(rank, call)
        out = engine.generate(ids, mask, G, max_new_tokens=8, temperature=1.0, top_p=1.0, eos_id=None,
                              pad_id=config.pad_token_id, seed=1000 * rank + 7)
        diff = 0.0
        if ids.shape[0]:
            with torch.no_grad():
                trainer = completion_logprobs(model, ids, mask, out.completion_ids, out.completion_mask, G)
            diff = float(((trainer - out.logprobs).abs() * out.completion_mask).max())
        calls.append({"prompts": ids.shape[0], "completion_ids": out.completion_ids.tolist(),
                      "completion_mask": out.completion_mask.tolist(), "logprobs": out.logprobs.tolist(),
                      "max_diff": diff})
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"heads": [attention.num_heads, attention.num_kv_heads], "calls": calls,
                   "unlinked": engine.unlinked_shared_memory}, f)


if __name__ == "__main__":
    main()
