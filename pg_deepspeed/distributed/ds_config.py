"""Load a DeepSpeed JSON config, resolve its ``"auto"`` values from the run's arguments, and refuse contradictions.

Resolved keys: the table in docs/deepspeed.md (any other ``"auto"`` is an error, never dropped).

The data-parallel size is world size / `sequence_parallel_size`. Missing batch-size keys are filled in the same
way, and `sequence_parallel_size`. A written value that disagrees with the arguments (a batch
size, or the enabled precision versus ``dtype``) raises :class:`DSConfigError` naming the key and both values.
"""
import json
import math
from typing import Any, Callable

import torch

from pg_deepspeed.distributed.parallel_dims import ParallelDims

# The one dtype table: the names a run accepts (with DeepSpeed's short aliases) and the torch dtype of each.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


class DSConfigError(ValueError):
    """A DeepSpeed config that cannot be read, resolved, or agreed with the run's arguments."""


def load_ds_config(
    path: str,
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    hidden_size: int,
    dtype: str,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    sequence_parallel_size: int = 1,
) -> dict:
    """Read the JSON config at ``path`` and return it with every ``"auto"`` resolved and checked (see module doc)."""
    for name, value in (("micro_batch_size", micro_batch_size), ("gradient_accumulation_steps",
                        gradient_accumulation_steps), ("world_size", world_size), ("hidden_size", hidden_size),
                        ("total_steps", total_steps), ("sequence_parallel_size", sequence_parallel_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a non-negative finite number, got {weight_decay!r}")
    dims = ParallelDims(world_size, sequence_parallel_size)
    dtype = dtype_name(dtype)

    config = _read_json(path)
    batch = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * dims.dp,
    }
    resolvers: dict[tuple[str, ...], Callable[[], Any]] = {
        **{(key,): (lambda key=key: batch[key]) for key in _BATCH_KEYS},
        ("sequence_parallel_size",): lambda: sequence_parallel_size,
        ("zero_optimization", "reduce_bucket_size"): lambda: hidden_size**2,
        ("zero_optimization", "stage3_prefetch_bucket_size"): lambda: int(0.9 * hidden_size**2),
        ("zero_optimization", "stage3_param_persistence_threshold"): lambda: 10 * hidden_size,
        ("optimizer", "params", "lr"): lambda: lr,
        ("optimizer", "params", "weight_decay"): lambda: weight_decay,
        ("scheduler", "params", "warmup_max_lr"): lambda: lr,
        ("scheduler", "params", "warmup_num_steps"): lambda: max(1, warmup_steps),
        ("scheduler", "params", "total_num_steps"): lambda: total_steps,
        ("bf16", "enabled"): lambda: dtype == "bfloat16",
        ("fp16", "enabled"): lambda: dtype == "float16",
    }
    _resolve_autos(config, (), resolvers, path)

    for key in _BATCH_KEYS:
        written = config.setdefault(key, batch[key])
        if written != batch[key]:
            raise DSConfigError(f"{path}: {key} is {written!r} in the config but the arguments give {batch[key]} "
                                f"(micro_batch_size={micro_batch_size}, gradient_accumulation_steps="
                                f"{gradient_accumulation_steps}, world_size={world_size}, sequence_parallel_size="
                                f"{sequence_parallel_size}); write \"auto\" or make them agree")
    written = config.setdefault("sequence_parallel_size", sequence_parallel_size)
    if written != sequence_parallel_size:
        raise DSConfigError(f"{path}: sequence_parallel_size is {written!r} in the config but the arguments give "
                            f"{sequence_parallel_size}; write \"auto\" or make them agree")
    for section, wanted in (("bf16", "bfloat16"), ("fp16", "float16")):
        enabled = config.get(section, {}).get("enabled", False)
        if enabled is not (dtype == wanted):
            raise DSConfigError(f"{path}: {section}.enabled is {json.dumps(enabled)} in the config but the "
                                f"argument dtype is {dtype!r}; write \"auto\" or make them agree")
    zero_stage(config, path)
    return config


def dtype_name(name: str) -> str:
    """The canonical name (a key of :data:`DTYPES`) of ``name`` or its alias; ValueError naming the choices."""
    canonical = _DTYPE_ALIASES.get(name, name)
    if canonical not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES) + sorted(_DTYPE_ALIASES)}, got {name!r}")
    return canonical


def precision(ds_config: dict) -> torch.dtype:
    """The dtype DeepSpeed trains in under a loaded ``ds_config`` (its bf16/fp16 sections, else float32)."""
    if ds_config.get("bf16", {}).get("enabled", False):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled", False):
        return torch.float16
    return torch.float32


def zero_stage(ds_config: dict, path: str = "ds_config") -> int:
    """The ZeRO stage of a loaded config (0 when there is no ``zero_optimization`` section)."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise DSConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except FileNotFoundError:
        raise DSConfigError(f"DeepSpeed config {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise DSConfigError(f"{path}, line {error.lineno} column {error.colno}: invalid JSON: {error.msg}") from None
    if not isinstance(config, dict):
        raise DSConfigError(f"{path}: a DeepSpeed config must be a JSON object, got {type(config).__name__}")
    for section in ("zero_optimization", "optimizer", "scheduler", "bf16", "fp16"):
        if not isinstance(config.get(section, {}), dict):
            raise DSConfigError(f"{path}: {section} must be a JSON object, got {config[section]!r}")
    return config


def _resolve_autos(node: dict, prefix: tuple[str, ...], resolvers: dict, path: str) -> None:
    """Replace in place every ``"auto"`` under ``node`` by its resolver's value; raise for an unknown one."""
    for key, value in node.items():
        where = prefix + (key,)
        if isinstance(value, dict):
            _resolve_autos(value, where, resolvers, path)
        elif value == "auto":
            if where not in resolvers:
                known = ", ".join(".".join(k) for k in resolvers)
                raise DSConfigError(f"{path}: {'.'.join(where)} is \"auto\" but pg_deepspeed cannot resolve it; "
                                    f"write a value (resolvable keys: {known})")
            node[key] = resolvers[where]()
