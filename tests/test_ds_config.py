"""pg_deepspeed.distributed.ds_config: every "auto" resolved from the run's arguments, contradictions and bad files
refused."""
import json
from pathlib import Path

import pytest

from pg_deepspeed.distributed.ds_config import DSConfigError, load_ds_config, zero_stage

DS_CONFIGS = Path(__file__).resolve().parent.parent / "ds_configs"
ARGS = dict(micro_batch_size=4, gradient_accumulation_steps=2, world_size=8, hidden_size=1024, dtype="bfloat16",
            lr=1e-6, weight_decay=0.1, warmup_steps=10, total_steps=500)


def write(tmp_path, config) -> str:
    path = tmp_path / "ds.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config, indent=2))
    return str(path)


def load(path, **overrides):
    return load_ds_config(path, **{**ARGS, **overrides})


@pytest.mark.parametrize("name, stage", [("zero3.json", 3), ("zero3_offload.json", 3), ("zero2.json", 2)])
def test_shipped_bf16_configs_resolve_every_auto(name, stage):
    config = load(str(DS_CONFIGS / name))
    assert "auto" not in json.dumps(config)
    assert zero_stage(config) == stage
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (4, 2, 64)
    assert config["zero_optimization"]["reduce_bucket_size"] == 1024**2
    assert config["optimizer"]["params"]["lr"] == 1e-6 and config["optimizer"]["params"]["weight_decay"] == 0.1
    assert config["scheduler"]["params"]["warmup_num_steps"] == 10
    assert config["scheduler"]["params"]["total_num_steps"] == 500


def test_zero3_bucket_sizes_follow_the_hidden_size():
    zero = load(str(DS_CONFIGS / "zero3.json"), hidden_size=1000)["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 900_000
    assert zero["stage3_param_persistence_threshold"] == 10_000


def test_cpu_config_is_float32_with_torch_adamw():
    config = load(str(DS_CONFIGS / "zero3_cpu.json"), dtype="float32")
    assert not config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert config["optimizer"]["type"] == "AdamW" and config["optimizer"]["params"]["torch_adam"] is True


def test_auto_precision_follows_the_dtype(tmp_path):
    path = write(tmp_path, {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}})
    assert load(path, dtype="float16")["fp16"]["enabled"] is True
    assert load(path, dtype="float16")["bf16"]["enabled"] is False


def test_missing_batch_sizes_are_filled_from_the_arguments(tmp_path):
    config = load(write(tmp_path, {"bf16": {"enabled": True}}))
    assert config["train_batch_size"] == 64


def test_zero_warmup_becomes_one_step_as_deepspeed_requires(tmp_path):
    path = write(tmp_path, {"bf16": {"enabled": True}, "scheduler": {"params": {"warmup_num_steps": "auto"}}})
    assert load(path, warmup_steps=0)["scheduler"]["params"]["warmup_num_steps"] == 1


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DSConfigError, match="nope.json does not exist"):
        load(str(tmp_path / "nope.json"))


def test_bad_json_names_path_and_line(tmp_path):
    path = write(tmp_path, '{\n  "train_batch_size": "auto",\n  "bf16": {"enabled": true,}\n}')
    with pytest.raises(DSConfigError, match=r"ds\.json, line 3 column .*invalid JSON"):
        load(path)


def test_non_object_config_is_refused(tmp_path):
    with pytest.raises(DSConfigError, match="must be a JSON object, got list"):
        load(write(tmp_path, [1, 2]))


def test_unknown_auto_is_refused_naming_the_key(tmp_path):
    path = write(tmp_path, {"bf16": {"enabled": True}, "gradient_clipping": "auto"})
    with pytest.raises(DSConfigError, match='gradient_clipping is "auto" but pg_deepspeed cannot resolve it'):
        load(path)


@pytest.mark.parametrize("key, written, argument", [
    ("train_micro_batch_size_per_gpu", 8, "4"),
    ("gradient_accumulation_steps", 1, "2"),
    ("train_batch_size", 32, "64"),
])
def test_batch_size_contradicting_the_arguments_names_key_and_both_values(tmp_path, key, written, argument):
    path = write(tmp_path, {"bf16": {"enabled": True}, key: written})
    with pytest.raises(DSConfigError, match=f"{key} is {written} in the config but the arguments give {argument}"):
        load(path)


def test_bf16_config_with_float32_dtype_is_refused(tmp_path):
    with pytest.raises(DSConfigError, match="bf16.enabled is true in the config but the argument dtype is 'float32'"):
        load(str(DS_CONFIGS / "zero3.json"), dtype="float32")


def test_float32_config_with_bf16_dtype_is_refused():
    with pytest.raises(DSConfigError, match="bf16.enabled is false in the config but the argument dtype is 'bfloat16'"):
        load(str(DS_CONFIGS / "zero3_cpu.json"))


def test_bad_zero_stage_is_refused(tmp_path):
    with pytest.raises(DSConfigError, match="zero_optimization.stage must be 0, 1, 2 or 3, got 4"):
        load(write(tmp_path, {"bf16": {"enabled": True}, "zero_optimization": {"stage": 4}}))


@pytest.mark.parametrize("argument, value", [("micro_batch_size", 0), ("dtype", "int8"), ("lr", -1.0),
                                             ("warmup_steps", -1)])
def test_bad_arguments_are_refused_before_reading(argument, value):
    with pytest.raises(ValueError, match=argument if argument != "dtype" else "dtype must be one of"):
        load("/never/read.json", **{argument: value})
