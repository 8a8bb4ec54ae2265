"""The trainer's side of vLLM's sleep mode (`--vllm_sleep`, pg_deepspeed/grpo/vllm_rollout.py) around a step: after
the rollout the engine sleeps; before the next one it wakes its weights, receives every weight (level 2 discarded
them, whatever the policy's step count), then wakes its KV cache. vLLM's sleep mode needs a CUDA GPU (none here; the
engine's own test is tests/vllm_rollouts/test_vllm_sleep.py, marked `cuda`), so the engine is a contract double."""
import math
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM

from pg_deepspeed.demo.presets import preset_config
from pg_deepspeed.grpo.args import GRPOArguments
from pg_deepspeed.grpo.vllm_rollout import VLLMRollout

FREED = 123_456


class SleepModeEngineDouble:
    """Contract double of :class:`pg_deepspeed.generation.vllm_engine.VLLMEngine`'s sleep mode: the same `sleep()`,
    `wake_up(tags)` and `weight_update()`, behaving as vllm 0.32 documents level 2 (`LLM.sleep`, `LLM.wake_up`):
    sleep discards the weights and the KV cache, waking maps the memory of the tags named with undefined contents
    (NaN here), and weights can be written only once their memory is mapped. It records its calls in order."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.weights = {name: p.detach().clone() for name, p in model.named_parameters()}
        self.awake = {"weights": True, "kv_cache": True}
        self.calls: list = []

    def sleep(self) -> int:
        self.calls.append("sleep")
        self.awake = {"weights": False, "kv_cache": False}
        return FREED

    def wake_up(self, tags) -> None:
        self.calls.append(("wake_up", tuple(tags)))
        for tag in tags:
            assert not self.awake[tag], f"{tag} woken twice"
            self.awake[tag] = True
            if tag == "weights":
                for tensor in self.weights.values():
                    tensor.fill_(math.nan)

    @contextmanager
    def weight_update(self):
        assert self.awake["weights"], "weights written into unmapped memory"
        self.calls.append("sync")

        def load(weights):
            for name, tensor in weights:
                self.weights[name].copy_(tensor)
            return {name for name, _ in weights}

        yield load

    def serves(self, model: torch.nn.Module) -> bool:
        """Awake, holding exactly `model`'s weights."""
        return all(self.awake.values()) and all(torch.equal(self.weights[n], p) for n, p in model.named_parameters())


def policy_and_engine(sleeps: bool):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config("tiny-qwen2"), dtype=torch.float32)
    model.global_steps = 0  # the DeepSpeed engine's optimizer-step count, which refresh() reads
    engine = SleepModeEngineDouble(model)
    return model, engine, VLLMRollout(engine, torch.device("cpu"), GRPOArguments(), bound=1e-3, sleeps=sleeps)


def test_a_slept_engine_wakes_its_weights_receives_every_one_then_wakes_its_kv_cache():
    model, engine, rollout = policy_and_engine(sleeps=True)
    rollout.refresh(model)
    assert rollout.sleep() == {"vllm_sleep_freed_bytes": float(FREED)}
    assert rollout.sleep() == {}  # asleep already: nothing more to free
    stats = rollout.refresh(model)  # the same policy step: only the sleep makes this sync necessary
    assert engine.calls == ["sync", "sleep", ("wake_up", ("weights",)), "sync", ("wake_up", ("kv_cache",))]
    assert stats["weight_sync_bytes"] == sum(p.numel() * 4 for p in model.parameters())
    assert engine.serves(model)


def test_every_step_sleeps_and_wakes_to_the_new_policy():
    model, engine, rollout = policy_and_engine(sleeps=True)
    for step in range(3):
        rollout.refresh(model)
        assert engine.serves(model)
        rollout.sleep()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        model.global_steps += 1
    assert engine.calls.count("sleep") == 3 and engine.calls.count("sync") == 3


def test_an_awake_engine_receives_weights_only_after_an_optimizer_step():
    model, engine, rollout = policy_and_engine(sleeps=False)
    rollout.refresh(model)
    assert rollout.sleep() == {} and rollout.refresh(model) == {}
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
    model.global_steps += 1
    assert rollout.refresh(model)["weight_sync_bytes"] > 0
    assert engine.calls == ["sync", "sync"] and engine.serves(model)
