"""DeepSpeed engines for the policy and the frozen reference, checkpoints that resume a run exactly, and HF export.

Typical use on every rank (``deepspeed --num_gpus N train.py ...``)::

    ds_config = load_ds_config(path, ...)                       # pg_deepspeed.ds_config
    policy = init_policy(build_model(name, ds_config, dtype=torch.float32, gradient_checkpointing=True), ds_config)
    reference = init_reference(name, ds_config, dtype=torch.float32)
    state = load_checkpoint(policy, output_dir) or {"step": 0}  # restores weights, optimizer, scheduler, RNG
    ...
    save_checkpoint(policy, output_dir, step, {"data_position": i})
    export_hf(policy, tokenizer, f"{output_dir}/final")

Under ZeRO-3 every model is built inside ``deepspeed.zero.Init``, so no rank ever holds all of its weights:
a preset is initialised one module at a time, a model directory is loaded one tensor at a time.
"""
import copy
import json
import os
import random

import deepspeed
import numpy as np
import torch
import torch._dynamo  # noqa: F401  (imported before zero.Init, which patches Tensor.__new__: see FACTS.md)
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase,
)
from transformers.initialization import no_init_weights
from transformers.integrations.deepspeed import initialize_weights_zero3, prevent_arange_dtype_change

from .ds_config import zero_stage
from .patch import patch_model
from .presets import PRESETS, is_preset, preset_config
from .tokenizer import build_char_tokenizer

CHECKPOINTS = "checkpoints"
_RNG_FILE = "rng_state_rank{rank}.pt"
_CLIENT_KEY = "pg_deepspeed"  # our client state, apart from the keys DeepSpeed adds to the same dict
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS = "model.safetensors"
_SHARD_BYTES = 4 * 2**30


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The character tokenizer for a preset, else the tokenizer saved in the model directory."""
    _check_model_name(model)
    return build_char_tokenizer() if is_preset(model) else AutoTokenizer.from_pretrained(model)


def load_config(model: str) -> PretrainedConfig:
    """The model's config: a preset's, else the one saved in the model directory."""
    _check_model_name(model)
    return preset_config(model) if is_preset(model) else AutoConfig.from_pretrained(model)


def build_model(
    model: str, ds_config: dict, *, dtype: torch.dtype, gradient_checkpointing: bool = False
) -> PreTrainedModel:
    """A patched causal LM from a preset name or a local HF directory, sharded at birth when ZeRO stage is 3.

    Presets are random-initialised (transformers' init, applied module by module on gathered weights); directories
    are loaded from their safetensors. ``use_cache`` is off: training never decodes incrementally.
    """
    _check_model_name(model)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    config = load_config(model)
    config.use_cache = False
    if zero_stage(ds_config) == 3:
        if _precision(ds_config) != dtype:
            raise ValueError(f"dtype {dtype} disagrees with the DeepSpeed config, which trains in "
                             f"{_precision(ds_config)} (its bf16/fp16 sections)")
        deepspeed.init_distributed()  # zero.Init reads the world size when it checks the batch sizes
        # transformers' own ZeRO-3 recipe: skip init on the empty shards, keep RoPE's arange dtypes, init after.
        # No dtype= here: zero.Init(dtype=float32) on a CPU accelerator builds bfloat16 (deepspeed 0.19.8 parses
        # `dtype or fp16 if fp16_supported else bf16 ...` as `(dtype or fp16) if ...`); from the config it is right
        with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            module = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if is_preset(model):
            initialize_weights_zero3(module)
        else:
            _load_sharded_weights(module, model)
    elif is_preset(model):
        module = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        module = AutoModelForCausalLM.from_pretrained(model, config=config, dtype=dtype)
    if gradient_checkpointing:
        # non-reentrant: recomputation re-enters ZeRO-3's gather hooks like the first forward
        if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return patch_model(module)


def init_policy(model: PreTrainedModel, ds_config: dict) -> deepspeed.DeepSpeedEngine:
    """``deepspeed.initialize`` with the optimizer and LR scheduler of the config; rank 0 prints the config."""
    if "optimizer" not in ds_config:
        raise ValueError("the DeepSpeed config has no 'optimizer' section; the policy needs one")
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=copy.deepcopy(ds_config),
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


def init_reference(model: str, ds_config: dict, *, dtype: torch.dtype) -> deepspeed.DeepSpeedEngine:
    """The frozen reference: same weights source and sharding as the policy, eval mode, no optimizer."""
    config = reference_config(ds_config)
    module = build_model(model, config, dtype=dtype)
    module.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    return engine


def save_checkpoint(engine: deepspeed.DeepSpeedEngine, output_dir: str, step: int, client_state: dict) -> str:
    """Save ``output_dir/checkpoints/step_{step}`` (weights, optimizer, scheduler, ``client_state`` + ``step``).

    Every rank must call it. ``client_state`` is stored once (rank 0's copy), so it must agree across ranks; each
    rank's RNG states (python, numpy, torch and the accelerator's) go in their own file. Returns the tag directory.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    save_dir = os.path.join(output_dir, CHECKPOINTS)
    tag = f"step_{step}"
    tag_dir = os.path.join(save_dir, tag)
    os.makedirs(tag_dir, exist_ok=True)
    torch.save(_rng_state(), os.path.join(tag_dir, _RNG_FILE.format(rank=dist.get_rank())))
    # DeepSpeed writes `latest` last, so a checkpoint it names always has its RNG files
    engine.save_checkpoint(save_dir, tag=tag, client_state={_CLIENT_KEY: {**client_state, "step": step}})
    return tag_dir


def latest_checkpoint(output_dir: str) -> str | None:
    """The directory of the newest complete checkpoint under ``output_dir``, or None when there is none."""
    latest = os.path.join(output_dir, CHECKPOINTS, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest, encoding="utf-8") as file:
        tag_dir = os.path.join(output_dir, CHECKPOINTS, file.read().strip())
    return tag_dir if os.path.isdir(tag_dir) else None


def load_checkpoint(engine: deepspeed.DeepSpeedEngine, output_dir: str) -> dict | None:
    """Resume from the newest checkpoint: weights, optimizer, scheduler and this rank's RNG states.

    Returns the saved client state (with ``step``), or None when ``output_dir`` has no checkpoint.
    """
    tag_dir = latest_checkpoint(output_dir)
    if tag_dir is None:
        return None
    load_path, client_state = engine.load_checkpoint(os.path.dirname(tag_dir), tag=os.path.basename(tag_dir))
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    rng_file = os.path.join(tag_dir, _RNG_FILE.format(rank=dist.get_rank()))
    if not os.path.isfile(rng_file):
        raise RuntimeError(f"{rng_file} is missing: the checkpoint was saved by a run with a different world size")
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state[_CLIENT_KEY]


def export_hf(engine: deepspeed.DeepSpeedEngine, tokenizer: PreTrainedTokenizerBase | None, out_dir: str) -> None:
    """Write a Hugging Face directory (safetensors, config, tokenizer) that ``from_pretrained`` loads.

    Every rank must call it: ZeRO-3 weights are gathered one tensor at a time into rank 0's CPU memory, which
    writes them in shards of at most 4 GiB, in the engine's training dtype.
    """
    module = _unwrap(engine)
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = _gather_state_dict(module, rank)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        _save_safetensors(state, out_dir)
        config = copy.deepcopy(module.config)
        config.use_cache = True
        config.dtype = next(iter(state.values())).dtype
        config.save_pretrained(out_dir)
        if module.can_generate() and module.generation_config is not None:
            module.generation_config.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    if dist.is_initialized():
        dist.barrier()


def _precision(ds_config: dict) -> torch.dtype:
    """The dtype DeepSpeed trains in under ``ds_config``."""
    if ds_config.get("bf16", {}).get("enabled", False):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled", False):
        return torch.float16
    return torch.float32


def _check_model_name(model: str) -> None:
    if not isinstance(model, str):
        raise TypeError(f"model must be a preset name or a directory path, got {type(model).__name__}")
    if not is_preset(model) and not os.path.isdir(model):
        raise ValueError(f"model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a local directory")


def _unwrap(engine: torch.nn.Module) -> PreTrainedModel:
    module = getattr(engine, "module", engine)
    if not isinstance(module, PreTrainedModel):
        raise TypeError(f"expected a DeepSpeed engine around a transformers model, got {type(engine).__name__}")
    return module


def _safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, _SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as file:
            return [os.path.join(directory, f) for f in sorted(set(json.load(file)["weight_map"].values()))]
    single = os.path.join(directory, _SAFETENSORS)
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"{directory} has neither {_SAFETENSORS} nor {_SAFETENSORS_INDEX}")


def _load_sharded_weights(module: PreTrainedModel, directory: str) -> None:
    """Fill a ZeRO-3 partitioned ``module`` from ``directory``'s safetensors, one gathered parameter at a time.

    Every rank reads the file headers (to agree on missing keys before any collective); only rank 0 reads data.
    """
    files = _safetensors_files(directory)
    source: dict[str, str] = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            source.update(dict.fromkeys(handle.keys(), path))
    params = dict(module.named_parameters())
    missing = sorted(name for name in params if name not in source)
    if missing:
        raise ValueError(f"{directory} lacks weights for {len(missing)} parameters, e.g. {missing[:5]}")
    rank = dist.get_rank()
    handles = {path: safe_open(path, framework="pt") for path in files} if rank == 0 else {}
    with torch.no_grad():
        for name, param in params.items():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank == 0:
                    param.data.copy_(handles[source[name]].get_tensor(name))


def _gather_state_dict(module: PreTrainedModel, rank: int) -> dict[str, torch.Tensor]:
    """Full CPU copies of the parameters (tied ones once) and persistent buffers on rank 0; empty elsewhere."""
    persistent = set(module.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.detach().to("cpu", copy=True).contiguous()
    if rank == 0:
        for name, buffer in module.named_buffers():
            if name in persistent:
                state[name] = buffer.detach().to("cpu", copy=True).contiguous()
    return state


def _save_safetensors(state: dict[str, torch.Tensor], out_dir: str) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > _SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, _SAFETENSORS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(out_dir, _SAFETENSORS_INDEX), "w", encoding="utf-8") as file:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, file, indent=2)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
