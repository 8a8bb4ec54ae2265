"""TRL's `GRPOTrainer` with every log-prob pass computing each prompt once per group.

    from pg_deepspeed.integrations.trl import PrefixGroupedGRPOTrainer   # instead of trl's GRPOTrainer

The subclass overrides one method, `_get_per_token_logps_and_entropies`: TRL calls it for the policy in the loss,
for the old policy (`num_iterations` > 1 or misaligned generation) and for the reference (`beta` > 0). Each call

1. finds the groups: rows are grouped by their prompt tokens (ids under the mask), not by position, because TRL
   shuffles the generation batch row by row, cuts it into `steps_per_generation` chunks and can split a group
   across processes; a group is simply the rows of one prompt that reached this call (any size, in any order);
2. packs every group once (`completion_logprobs`: one prompt, G completions) and runs the patched decoder;
3. returns log-probs (and entropies) in TRL's row order, so TRL's loss, advantages and metrics are untouched.

Generation, rewards and the loss stay TRL's own, so a run with a given seed follows stock TRL's trajectory.
Inputs the grouped path cannot serve (vision-language tensors, the MoE load-balancing loss) go through TRL's own
method, with a one-time warning naming the option.

Shapes: N rows handed over by TRL, Lp prompt width, Lc = `logits_to_keep` completion width, B distinct prompts.
"""
from __future__ import annotations

import types
import warnings
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from typing import Any, Callable

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import Tensor, nn
from transformers import PreTrainedModel

from pg_deepspeed.models.logprobs import completion_logprobs
from pg_deepspeed.models.patch import patch_model, unwrap_model

SUPPORTED_TRL = ">=1.16.0,<1.17"  # the `trl` extra in setup.cfg pins the same range


def check_trl_version(found: str) -> None:
    """Raise a RuntimeError naming the installed and the supported TRL versions unless `found` is supported.

    The override depends on what TRL hands to `_get_per_token_logps_and_entropies` (argument names, left-padded
    prompts, `logits_to_keep` = completion width, the fused LM head's logit maths), read from TRL 1.16.
    """
    if not SpecifierSet(SUPPORTED_TRL).contains(Version(found), prereleases=True):
        raise RuntimeError(
            f"PrefixGroupedGRPOTrainer supports trl{SUPPORTED_TRL} but trl {found} is installed; "
            "install a supported one with pip install 'pg_deepspeed[trl]'"
        )


try:
    from trl import GRPOTrainer
except ImportError as error:  # the optional extra is missing
    raise ImportError(
        "pg_deepspeed.integrations.trl needs TRL: pip install 'pg_deepspeed[trl]'"
    ) from error


# ---------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class PromptGroups:
    """The rows of a batch grouped by prompt.

    order: [N] row indices, group after group (a group's rows in arrival order); groups in order of first arrival.
    sizes: B group sizes (they add up to N). first: [B] one row of each group, whose prompt is the group's.
    """

    order: Tensor
    sizes: list[int]
    first: Tensor

    def chunks(self, max_rows: int | None) -> list[tuple[int, int]]:
        """Consecutive runs of whole groups `(first group, end group)` of at most `max_rows` rows each (a group
        larger than `max_rows` is a run of its own); one run of every group when `max_rows` is None."""
        if max_rows is None:
            return [(0, len(self.sizes))]
        runs, start, rows = [], 0, 0
        for g, size in enumerate(self.sizes):
            if rows and rows + size > max_rows:
                runs.append((start, g))
                start, rows = g, 0
            rows += size
        runs.append((start, len(self.sizes)))
        return runs


def group_rows_by_prompt(prompt_ids: Tensor, prompt_mask: Tensor) -> PromptGroups:
    """prompt_ids, prompt_mask: [N, Lp] (any padding) -> the rows grouped by their prompt tokens under the mask.

    Two rows are in one group exactly when their unmasked prompt tokens are equal, wherever the rows are.
    """
    ids, mask = prompt_ids.detach().cpu(), prompt_mask.detach().cpu().bool()
    index: dict[bytes, int] = {}
    members: list[list[int]] = []
    for row in range(ids.shape[0]):
        key = ids[row][mask[row]].numpy().tobytes()
        group = index.setdefault(key, len(members))
        if group == len(members):
            members.append([])
        members[group].append(row)
    device = prompt_ids.device
    order = torch.tensor([row for rows in members for row in rows], dtype=torch.long, device=device)
    first = torch.tensor([rows[0] for rows in members], dtype=torch.long, device=device)
    return PromptGroups(order, [len(rows) for rows in members], first)


def grouped_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    logits_to_keep: int,
    *,
    temperature: float,
    return_entropy: bool,
    max_rows: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """TRL's batch -> (log-probs [N, Lc], entropies [N, Lc] or None) in its row order, each prompt computed once.

    model: a patched causal LM (or DDP / a DeepSpeed engine / a PEFT model around one).
    input_ids, attention_mask: [N, Lp + Lc] = `[prompt | completion]`, prompts left-padded, rows in any order.
    max_rows: completion rows per packed forward (TRL's `batch_size` chunking), whole groups at a time.
    """
    if not isinstance(logits_to_keep, int) or not 0 < logits_to_keep < input_ids.shape[1]:
        raise ValueError(
            f"logits_to_keep must be the completion width, 0 < it < {input_ids.shape[1]}, got {logits_to_keep!r}"
        )
    prompt_ids, prompt_mask = input_ids[:, :-logits_to_keep], attention_mask[:, :-logits_to_keep]
    completion_ids, completion_mask = input_ids[:, -logits_to_keep:], attention_mask[:, -logits_to_keep:]
    groups = group_rows_by_prompt(prompt_ids, prompt_mask)
    hf = _hf_model(model)

    def run() -> tuple[Tensor, ...]:
        logps, entropies, done = [], [], 0
        for start, end in groups.chunks(max_rows):
            rows = groups.order[done : done + sum(groups.sizes[start:end])]
            done += len(rows)
            first = groups.first[start:end]
            out = completion_logprobs(
                hf, prompt_ids[first], prompt_mask[first], completion_ids[rows], completion_mask[rows],
                groups.sizes[start:end], temperature=temperature, return_entropy=return_entropy,
            )
            logps.append(out[0] if return_entropy else out)
            entropies.append(out[1] if return_entropy else None)
        grouped = (torch.cat(logps),) + ((torch.cat(entropies),) if return_entropy else ())
        return grouped

    grouped = _inside_wrapper_forward(model, run)
    back = torch.empty_like(groups.order)  # back[row] = where TRL's row sits in the grouped order
    back[groups.order] = torch.arange(len(groups.order), device=back.device)
    logps = grouped[0].index_select(0, back)
    return logps, (grouped[1].index_select(0, back) if return_entropy else None)


# ---------------------------------------------------------------------------------------------- wrappers
def _hf_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside DDP, a DeepSpeed engine and/or a PEFT model (LoRA layers stay in it)."""
    inner = model
    while not isinstance(inner, PreTrainedModel) and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    get_base_model = getattr(inner, "get_base_model", None)
    if not isinstance(inner, PreTrainedModel) and callable(get_base_model):  # peft.PeftModel
        inner = get_base_model()
    return unwrap_model(inner)


def _inside_wrapper_forward(model: nn.Module, run: Callable[[], Any]) -> Any:
    """`run()` called from inside `model.forward` when `model` wraps a module (DistributedDataParallel, a DeepSpeed
    engine), else called directly.

    Why: those wrappers do per-forward work the backward depends on. DDP's forward arms the gradient all-reduce (a
    backward without it leaves every rank with its own gradient, silently); a DeepSpeed engine's forward counts the
    ZeRO micro-batch and hooks the outputs for loss scaling. The grouped pass calls the decoder itself, so the
    wrapped module's forward is swapped for `run` for the duration of one call through the wrapper.
    """
    inner = getattr(model, "module", None)
    if isinstance(model, PreTrainedModel) or not isinstance(inner, nn.Module):
        return run()
    had_own = "forward" in inner.__dict__  # TRL's fused LM head sets an instance-level forward
    own = inner.__dict__.get("forward")
    inner.forward = lambda *args, **kwargs: run()
    try:
        return model()
    finally:
        if had_own:
            inner.forward = own
        else:
            del inner.forward


# ---------------------------------------------------------------------------------------------- trainer
# arguments of TRL 1.16's `_get_per_token_logps_and_entropies` that carry vision-language inputs
_MULTIMODAL = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)


def _streamed_colocate_sync(generation) -> None:
    """TRL's colocate weight sync (`VLLMGeneration.sync_weights`) through vLLM's in-place reload
    (:func:`pg_deepspeed.generation.vllm_engine.streamed_weight_update`): TRL 1.16 calls the engine model's
    `load_weights` directly, which fails on vLLM's CPU build ("'Parameter' object has no attribute 'weight_loader'")
    and leaves a tied LM head's packed copy stale; the prefix cache is reset after. The parameters come from TRL's own
    iterator (gathered one at a time under ZeRO-3, PEFT merged), each copied before its gather ends, since vLLM holds
    a fused layer's parts until all have arrived."""
    from pg_deepspeed.generation.vllm_engine import streamed_weight_update

    if generation.enable_sleep_mode:  # as TRL does: the weights must be mapped before they are written
        generation.llm.wake_up(tags=["weights"])
        generation._llm_weights_sleeping = False
    with streamed_weight_update(generation.llm) as load:
        for name, tensor in generation._iter_named_params():
            load([(name, tensor.detach().clone())])


class PrefixGroupedGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose log-prob passes (policy, old policy, reference) compute each prompt once per group.

    Same constructor and arguments as `trl.GRPOTrainer`. The policy (and the reference model, when TRL builds one)
    is patched with `pg_deepspeed.patch_model`; a patched model without a layout runs its original attention, so
    generation and every other forward are unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_trl_version(installed_version("trl"))
        super().__init__(*args, **kwargs)
        self._prefix_grouping_fallbacks: set[str] = set()
        patch_model(_hf_model(self.model))
        if self.ref_model is not None:
            patch_model(_hf_model(self.ref_model))
        generation = getattr(self, "vllm_generation", None)
        if generation is not None and generation.mode == "colocate":
            generation.sync_weights = types.MethodType(_streamed_colocate_sync, generation)

    def _ungroupable(self, compute_aux_loss: bool, multimodal: dict[str, Any]) -> list[str]:
        """The options of this call the grouped path cannot serve (each warned about once per trainer)."""
        names = [name for name in _MULTIMODAL if multimodal.get(name) is not None]
        names += [name for name in multimodal if name not in _MULTIMODAL and multimodal[name] is not None]
        if compute_aux_loss:
            names.append("compute_aux_loss (the MoE load-balancing loss over the padded batch)")
        for name in names:
            if name not in self._prefix_grouping_fallbacks:
                self._prefix_grouping_fallbacks.add(name)
                warnings.warn(
                    f"PrefixGroupedGRPOTrainer: {name} cannot be prefix-grouped; these log-prob passes run TRL's "
                    "own forward (each prompt repeated per completion)",
                    stacklevel=3,
                )
        return names

    def _get_per_token_logps_and_entropies(
        self,
        model: nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **multimodal: Any,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """TRL's method, prefix-grouped: (log-probs [N, Lc], entropies [N, Lc] or None, None), 0 at masked places.

        input_ids, attention_mask: [N, Lp + Lc] rows in any order; batch_size bounds the completion rows per
        forward (whole groups at a time), as TRL's chunking does.
        """
        if self._ungroupable(compute_aux_loss, multimodal):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal,
            )
        with self.accelerator.autocast():
            logps, entropies = grouped_logprobs(
                model, input_ids, attention_mask, logits_to_keep,
                temperature=self.temperature, return_entropy=compute_entropy, max_rows=batch_size,
            )
        return logps, entropies, None
