"""`--rollout_engine vllm`: the trainer's side of a colocated vLLM engine. Its weights follow the policy (synced
before any sampling with weights the engine does not have), it samples the rollout, and every step proves it
sampled the policy being trained.

**Fresh, every step.** vLLM returns the log-probability of each token it sampled; the trainer's first log-prob pass of
the step (the old-policy pass, run for every step with this engine) computes the same tokens under the same weights.
`rollout_logprob_diff_mean` and `rollout_logprob_diff_max` are |trainer − vLLM| over every completion token of all
ranks. In float32 a correct sync leaves only the two implementations' rounding; an engine that missed a weight, or
a whole sync, samples another policy, and its difference is orders of magnitude larger. A mean above
`--max_rollout_logprob_diff` stops the run (:class:`StaleRolloutError`, on every rank, before the update) naming the
weight sync. The default and the measurements behind it: docs/trainer.md.

**Training against what was sampled** (`--rollout_importance_correction`): :func:`truncated_importance_weights` gives
each token the ratio exp(trainer − vLLM) capped at `--rollout_importance_cap` (TIS), which `grpo_loss` multiplies into
that token's clipped policy term.

**Asleep during the update** (`--vllm_sleep`, on CUDA by default): after the rollout the engine sleeps (level 2: its
KV cache and weights released, see :meth:`VLLMEngine.sleep`) and the freed bytes are logged; the next refresh wakes
its weights, syncs every weight (the discarded ones included, whatever the policy's step count), then wakes its KV
cache.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pg_deepspeed.collectives import all_gather_cat, all_mean
from pg_deepspeed.distributed.ds_config import dtype_name
from pg_deepspeed.distributed.vllm_sync import WeightSync
from pg_deepspeed.generation.sampling import Rollout
from pg_deepspeed.generation.vllm_engine import VLLMEngine, logprobs_mode, sleep_mode_available, vllm_model_dir


# --max_rollout_logprob_diff when unset, by --dtype. Measured on CPU (docs/trainer.md): a correct sync leaves a mean
# of 1.3e-7 (tiny Qwen2) and 8e-6 (SmolLM2-135M) in float32, 0.05-0.06 in bfloat16 (SmolLM2); an engine one optimizer
# step behind shows 0.037 (tiny, lr 1e-4) and 0.055 (SmolLM2, lr 5.5e-6) in float32; one never synced, 4-5.
DEFAULT_MAX_LOGPROB_DIFF = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.5}


class StaleRolloutError(RuntimeError):
    """The engine's log-probs disagree with the trainer's: it sampled weights the trainer does not have."""


class VLLMRollout:
    """The engine of this rank, its weight sync and its freshness check; :meth:`start` builds one for a run.

    engine: the rank's :class:`VLLMEngine`; device: this rank's; grpo: the run's sampling options; bound: the
    freshness bound (--max_rollout_logprob_diff, resolved); sleeps: whether the engine sleeps after each rollout.
    """

    def __init__(self, engine: VLLMEngine, device: torch.device, grpo, bound: float, sleeps: bool) -> None:
        self.engine, self.grpo, self.bound, self.sleeps = engine, grpo, bound, sleeps
        self.weights = WeightSync(engine, device)
        self.asleep = False
        self.synced_version: int | None = None

    @classmethod
    def start(cls, setup, device: torch.device) -> "VLLMRollout":
        """The engine of this rank for the run `setup` (a TrainingSetup: model, dtype, the longest sequence, the
        sampling and vLLM options), started. Collective (vLLM builds its groups over the ranks)."""
        grpo, model_args = setup.grpo, setup.model_args
        bound = grpo.max_rollout_logprob_diff
        if bound is None:
            bound = DEFAULT_MAX_LOGPROB_DIFF[dtype_name(model_args.dtype)]
        sleeps = grpo.vllm_sleep == "on" or (grpo.vllm_sleep == "auto" and sleep_mode_available())
        engine = VLLMEngine(
            vllm_model_dir(setup.config, model_args.model), dtype=dtype_name(model_args.dtype),
            max_model_len=setup.max_length, gpu_memory_utilization=grpo.vllm_gpu_memory_utilization,
            tensor_parallel_size=grpo.vllm_tensor_parallel_size, enforce_eager=grpo.vllm_enforce_eager,
            logprobs=logprobs_mode(grpo.temperature, grpo.top_p), seed=setup.train.seed, sleep=sleeps,
        )
        if dist.get_rank() == 0:
            print(f"[pg_deepspeed] vLLM engines started in {engine.start_time_s:.1f} s, one per "
                  f"{grpo.vllm_tensor_parallel_size} rank(s) (tensor parallel size {grpo.vllm_tensor_parallel_size}, "
                  f"enforce_eager={grpo.vllm_enforce_eager}, sleep mode {'on' if sleeps else 'off'})", flush=True)
        return cls(engine, device, grpo, bound, sleeps)

    def refresh(self, policy) -> dict:
        """Sync the engine when the policy has taken an optimizer step since the last sync, or never was synced, or
        the engine slept since (level 2 discarded its weights: it wakes them, syncs, then wakes its KV cache);
        returns the sync's metrics ({} when nothing was sent). Collective: every rank's policy has the same step
        count and every rank's engine sleeps or none does, so every rank syncs or none does."""
        version = int(getattr(policy, "global_steps", 0))
        if self.asleep:  # level 2 discarded the weights: wake them, sync all of them, then the KV cache
            self.engine.wake_up(["weights"])
            self.synced_version = None
        stats = {}
        if version != self.synced_version:
            stats = self.weights.sync(policy)
            self.synced_version = version
        if self.asleep:
            self.engine.wake_up(["kv_cache"])
            self.asleep = False
        return stats

    def sleep(self) -> dict:
        """After the rollout, with --vllm_sleep: release the engine's KV cache and weights for the update;
        {"vllm_sleep_freed_bytes": device bytes freed} ({} without sleep mode)."""
        if not self.sleeps or self.asleep:
            return {}
        freed = self.engine.sleep()
        self.asleep = True
        return {"vllm_sleep_freed_bytes": float(freed)}

    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, G: int, tokenizer, temperature: float,
               seed: int) -> Rollout:
        """G completions of each prompt ([B, Lp] left-padded) with their vLLM log-probs (none when greedy)."""
        return self.engine.generate(
            prompt_ids, prompt_mask, G, max_new_tokens=self.grpo.max_new_tokens, temperature=temperature,
            top_p=self.grpo.top_p, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seed=seed,
            logprobs=temperature > 0,
        )

    def check_fresh(self, trainer_logps: torch.Tensor, rollout_logps: torch.Tensor, mask: torch.Tensor,
                    where: str) -> dict:
        """{"rollout_logprob_diff_mean", "rollout_logprob_diff_max"} over all ranks' completion tokens
        (trainer_logps, rollout_logps, mask: [N, Lc]); raises :class:`StaleRolloutError` on every rank when the mean
        exceeds --max_rollout_logprob_diff. Collective."""
        diff = (trainer_logps.float() - rollout_logps.float()).abs() * mask
        totals = all_mean({"sum": float(diff.sum()), "tokens": float(mask.sum())})
        mean = totals["sum"] / max(totals["tokens"], 1.0)
        largest = float(all_gather_cat(diff.max().reshape(1) if diff.numel() else diff.new_zeros(1)).max())
        bound = self.bound
        if not mean <= bound:  # NaN included
            raise StaleRolloutError(
                f"{where}: vLLM's log-probs of its samples differ from the policy's by {mean:.4g} on average (max "
                f"{largest:.4g}), above --max_rollout_logprob_diff {bound}: the weight sync to the vLLM engine did not "
                "give it the policy's weights (stopping before the update)")
        return {"rollout_logprob_diff_mean": mean, "rollout_logprob_diff_max": largest}


def truncated_importance_weights(trainer_logps: torch.Tensor, rollout_logps: torch.Tensor, mask: torch.Tensor,
                                 cap: float) -> tuple[torch.Tensor, dict]:
    """Truncated importance sampling (TIS, Yao et al. 2025): per sampled token the ratio of the trainer's probability
    to the sampler's, exp(trainer − vLLM), capped at `cap`; [N, Lc] weights (0 at padding) and the metrics
    {"rollout_is_ratio_mean", "rollout_is_ratio_max", "rollout_is_capped_frac"} over all ranks' tokens (the ratio
    before the cap). Collective."""
    ratio = torch.exp(trainer_logps.float() - rollout_logps.float()) * mask
    weights = ratio.clamp(max=cap) * mask
    totals = all_mean({"sum": float(ratio.sum()), "capped": float(((ratio > cap) & mask.bool()).sum()),
                       "tokens": float(mask.sum())})
    tokens = max(totals["tokens"], 1.0)
    largest = float(all_gather_cat(ratio.max().reshape(1) if ratio.numel() else ratio.new_zeros(1)).max())
    return weights, {"rollout_is_ratio_mean": totals["sum"] / tokens, "rollout_is_ratio_max": largest,
                     "rollout_is_capped_frac": totals["capped"] / tokens}
