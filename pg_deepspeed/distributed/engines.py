"""Models, tokenizers and DeepSpeed engines: what a run builds before its first step.

Typical use on every rank (``deepspeed --num_gpus N train.py ...``)::

    ds_config = load_ds_config(path, ...)                                    # pg_deepspeed.distributed.ds_config
    policy = init_policy(build_model(name, ds_config, dtype=torch.float32), ds_config)
    reference = init_reference(name, ds_config, dtype=torch.float32)

Loading goes through transformers' own ZeRO-3 path: while a :class:`HfDeepSpeedConfig` of a stage-3 config is
alive, ``from_pretrained`` / ``from_config`` build the model inside ``deepspeed.zero.Init`` (no rank ever holds all
of its weights), apply every checkpoint key conversion (for example transformers 5's fused MoE experts), and load
one module at a time from rank 0. transformers keeps only a weak reference to that object, so this module keeps
the strong one (:data:`_HF_DS_CONFIG`) for the life of the process.
"""
from __future__ import annotations

import copy
import json
import os

import deepspeed
import torch
import torch._dynamo  # noqa: F401  (before zero.Init: a lazy dynamo import inside it fails, "Signature mismatch")
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers import PreTrainedTokenizerBase
from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

from pg_deepspeed.demo.char_tokenizer import build_char_tokenizer
from pg_deepspeed.demo.presets import PRESETS, is_preset, preset_config
from pg_deepspeed.distributed.ds_config import precision, zero_stage
from pg_deepspeed.distributed.lr_schedule import split_scheduler
from pg_deepspeed.distributed.parallel_dims import ParallelDims
from pg_deepspeed.distributed.sequence_parallel import parallelize_sequence, sequence_parallel_mpu
from pg_deepspeed.models.patch import patch_model

# Files a Hugging Face model directory holds its weights in (transformers' names).
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)

_HF_DS_CONFIG: HfDeepSpeedConfig | None = None  # the strong reference transformers' weakref needs (see module doc)


class ModelNotFoundError(ValueError):
    """``model`` names neither a preset nor a directory holding a Hugging Face model."""


def check_model(model: str) -> None:
    """Refuse, naming the path, a ``model`` that is not a preset or a directory with a config and weights."""
    if not isinstance(model, str):
        raise TypeError(f"model must be a preset name or a directory path, got {type(model).__name__}")
    if is_preset(model):
        return
    if not os.path.isdir(model):
        raise ModelNotFoundError(f"model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                                 f"nor a local directory")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ModelNotFoundError(f"model directory {model!r} holds no model: it has no config.json")
    if not any(os.path.isfile(os.path.join(model, name)) for name in WEIGHT_FILES):
        raise ModelNotFoundError(f"model directory {model!r} holds no weights: none of {', '.join(WEIGHT_FILES)}")


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The character tokenizer for a preset, else the tokenizer saved in the model directory."""
    check_model(model)
    if is_preset(model):
        return build_char_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"model directory {model!r} has a model but no tokenizer transformers can "
                                 f"load: {error}") from None


def load_config(model: str) -> PretrainedConfig:
    """The model's config: a preset's, else the one saved in the model directory."""
    check_model(model)
    return preset_config(model) if is_preset(model) else AutoConfig.from_pretrained(model)


def build_model(
    model: str, ds_config: dict, *, dtype: torch.dtype, gradient_checkpointing: bool = False,
    max_length: int | None = None, attention_backend: str = "auto",
) -> PreTrainedModel:
    """A patched causal LM from a preset name or a local HF directory, sharded at birth when ZeRO stage is 3.

    Presets are random-initialised by transformers; directories are loaded by ``from_pretrained``. ``use_cache``
    is off: training never decodes incrementally. ``max_length`` (the longest prompt + completion of the run) goes
    to :func:`patch_model`, so a sliding window that covers the run is accepted; ``attention_backend`` is the
    grouped attention's backend ("auto", "flash_attn_3", "flash_attn", "torch", "cpu").
    """
    check_model(model)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    config = load_config(model)
    config.use_cache = False
    _use_ds_config_for_loading(ds_config, dtype)
    if is_preset(model):
        module = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        module = AutoModelForCausalLM.from_pretrained(model, config=config, dtype=dtype)
    if gradient_checkpointing:
        # non-reentrant: recomputation re-enters ZeRO-3's gather hooks like the first forward
        if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return patch_model(module, backend=attention_backend, max_length=max_length)


def init_policy(model: PreTrainedModel, ds_config: dict, *, dims: ParallelDims | None = None
                ) -> deepspeed.DeepSpeedEngine:
    """``deepspeed.initialize`` with the optimizer and LR scheduler of the config, the model parallelized over
    `dims` (default: every rank data parallel); rank 0 prints the config. A linear WarmupCosineLR is built by
    :mod:`pg_deepspeed.distributed.lr_schedule` (DeepSpeed's own trains the first two steps at lr 0)."""
    if "optimizer" not in ds_config:
        raise ValueError("the DeepSpeed config has no 'optimizer' section; the policy needs one")
    dims = dims or ParallelDims(dist.get_world_size())
    config, lr_scheduler = split_scheduler(copy.deepcopy(ds_config))
    engine, *_ = deepspeed.initialize(
        model=parallelize_sequence(model, dims, ds_config),
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=config,
        lr_scheduler=lr_scheduler,
        mpu=sequence_parallel_mpu(dims),
    )
    if engine.global_rank == 0:
        print(f"[pg_deepspeed] resolved DeepSpeed config:\n{json.dumps(ds_config, indent=2)}", flush=True)
    return engine


def reference_config(ds_config: dict) -> dict:
    """The policy's config without what only training needs (optimizer, scheduler, optimizer offload)."""
    config = copy.deepcopy(ds_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    config.get("zero_optimization", {}).pop("offload_optimizer", None)
    return config


def init_reference(
    model: str, ds_config: dict, *, dtype: torch.dtype, max_length: int | None = None,
    dims: ParallelDims | None = None, attention_backend: str = "auto",
) -> deepspeed.DeepSpeedEngine:
    """The frozen reference: same weights source, sharding and sequence parallelism as the policy, eval mode, no
    optimizer."""
    config = reference_config(ds_config)
    module = build_model(model, config, dtype=dtype, max_length=max_length, attention_backend=attention_backend)
    module.requires_grad_(False)
    dims = dims or ParallelDims(dist.get_world_size())
    module = parallelize_sequence(module, dims, config)
    engine, *_ = deepspeed.initialize(model=module, config=config, mpu=sequence_parallel_mpu(dims))
    engine.eval()
    return engine


def _use_ds_config_for_loading(ds_config: dict, dtype: torch.dtype) -> None:
    """Make transformers' loaders shard into ``zero.Init`` under a stage-3 config, and load plainly otherwise."""
    global _HF_DS_CONFIG
    if zero_stage(ds_config) != 3:
        _HF_DS_CONFIG = None
        unset_hf_deepspeed_config()
        return
    if precision(ds_config) != dtype:
        # zero.Init takes its dtype from the config (transformers passes none), so the two must agree
        raise ValueError(f"dtype {dtype} disagrees with the DeepSpeed config, which trains in "
                         f"{precision(ds_config)} (its bf16/fp16 sections)")
    deepspeed.init_distributed()  # zero.Init reads the world size when it checks the batch sizes
    _HF_DS_CONFIG = HfDeepSpeedConfig(copy.deepcopy(ds_config))


def check_patchable(config: PretrainedConfig, max_length: int) -> None:
    """Refuse before any heavy work a model that :func:`patch_model` would refuse: the same check, run on a copy
    built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    patch_model(model, max_length=max_length)
