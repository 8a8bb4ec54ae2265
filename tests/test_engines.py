"""pg_deepspeed.distributed: engines (build_model, load_tokenizer), checkpoint and export. Refusals and checkpoint
choice in-process, ZeRO-3 behaviour through the real launcher.

The distributed tests share two launcher runs of tests/dist/zero3_train.py (see its docstring): `main` trains
three policies (A prefix-grouped with activation checkpointing, B `prefix_grouping=False`, C the naive padded
forward of tests/reference.py), builds the reference and exports A; `resume` continues A from its step-2 checkpoint.
One run of tests/dist/load_dirs.py loads three directories saved here by transformers (tied dense, Qwen3-MoE,
sharded) under ZeRO-3 and exports them.
"""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_deepspeed
from reference import padded_completion_logprobs, random_grpo_batch, tiny_causal_lm
from safetensors import safe_open
from pg_deepspeed.distributed.engines import build_model, load_tokenizer
from pg_deepspeed.distributed.checkpoint import _write_manifest, latest_checkpoint
from pg_deepspeed.demo.char_tokenizer import build_char_tokenizer

SCRIPT = "tests/dist/zero3_train.py"
LOAD_BATCH_SEED = 7  # tests/dist/load_dirs.py's BATCH_SEED
ZERO3_FP32 = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------- refusals, no launcher
def test_build_model_refuses_a_name_that_is_neither_preset_nor_directory():
    with pytest.raises(ValueError, match="'/no/such/model' is neither a preset"):
        build_model("/no/such/model", ZERO3_FP32, dtype=torch.float32)


def test_build_model_refuses_a_non_dtype():
    with pytest.raises(TypeError, match="dtype"):
        build_model("tiny-qwen2", ZERO3_FP32, dtype="float32")


def test_build_model_refuses_a_dtype_the_zero3_config_does_not_train_in():
    with pytest.raises(ValueError, match="disagrees with the DeepSpeed config"):
        build_model("tiny-qwen2", ZERO3_FP32, dtype=torch.bfloat16)


def test_load_tokenizer_of_a_preset_is_the_char_tokenizer():
    assert load_tokenizer("tiny-llama").get_vocab() == build_char_tokenizer().get_vocab()


def test_no_checkpoint_means_none(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None


def lrs_of_the_first_updates(monkeypatch, ds_config: dict, updates: int) -> list[float]:
    """The learning rate each of the first `updates` optimizer steps of `init_policy`'s engine uses. deepspeed.initialize
    is replaced by its scheduler logic alone (engine.py, _configure_lr_scheduler: a client scheduler first, else the
    config's), driven as DeepSpeed's engine.step drives it: the optimizer steps, then the scheduler."""
    import deepspeed
    from deepspeed.runtime.lr_schedules import WarmupCosineLR
    from types import SimpleNamespace
    from pg_deepspeed.distributed import engines
    from pg_deepspeed.distributed.parallel_dims import ParallelDims

    model = torch.nn.Linear(2, 2)
    built = {}

    def initialize(model, model_parameters, config, lr_scheduler=None, mpu=None):
        optimizer = torch.optim.AdamW(model_parameters, lr=config["optimizer"]["params"]["lr"])
        if lr_scheduler is not None:
            built["scheduler"] = lr_scheduler(optimizer)
        else:
            built["scheduler"] = WarmupCosineLR(optimizer, **config["scheduler"]["params"])
        built["optimizer"] = optimizer
        return SimpleNamespace(global_rank=1), optimizer, None, built["scheduler"]

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    monkeypatch.setattr(engines, "parallelize_sequence", lambda model, dims, config: model)
    engines.init_policy(model, ds_config, dims=ParallelDims(1))
    used = []
    for _ in range(updates):
        used.append(built["optimizer"].param_groups[0]["lr"])
        built["optimizer"].step()
        built["scheduler"].step()
    return used


def shipped_config(warmup_steps: int, total_steps: int, lr: float = 1e-5) -> dict:
    from pg_deepspeed.distributed.ds_config import load_ds_config

    return load_ds_config("ds_configs/zero3_cpu.json", micro_batch_size=2, gradient_accumulation_steps=1, world_size=2,
                          hidden_size=8, dtype="float32", lr=lr, weight_decay=0.0, warmup_steps=warmup_steps,
                          total_steps=total_steps)


@pytest.mark.parametrize("warmup_steps", [0, 1])
def test_the_first_optimizer_step_trains_at_the_peak_lr_when_the_warmup_is_one_step_or_none(monkeypatch,
                                                                                            warmup_steps):
    """--warmup_steps 1 (or 0), --max_steps 3: every one of the three steps moves the weights. DeepSpeed's own
    WarmupCosineLR gave [0, 0, 5e-6]: a three-step run trained on one."""
    used = lrs_of_the_first_updates(monkeypatch, shipped_config(warmup_steps, 3), 3)
    assert used[0] == pytest.approx(1e-5)
    assert used[0] > used[1] > used[2] == pytest.approx(1e-6)  # cosine down to cos_min_ratio 0.1 at the last step


def test_a_linear_warmup_of_w_steps_reaches_the_peak_at_step_w_then_decays_to_the_floor_at_the_last(monkeypatch):
    used = lrs_of_the_first_updates(monkeypatch, shipped_config(4, 10, lr=1.0), 10)
    assert used[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a > b for a, b in zip(used[3:], used[4:]))
    assert used[9] == pytest.approx(0.1)


def test_the_schedule_resumes_from_its_own_state_and_from_a_checkpoint_of_deepspeeds_warmup_cosine():
    from deepspeed.runtime.lr_schedules import WarmupCosineLR
    from pg_deepspeed.distributed.lr_schedule import WarmupCosine

    def schedule(**kwargs):
        optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1.0)
        return optimizer, WarmupCosine(optimizer, 2, 10, cos_min_ratio=0.1, **kwargs)

    optimizer, run = schedule()
    for _ in range(5):
        optimizer.step()
        run.step()
    _, resumed = schedule()
    resumed.load_state_dict(run.state_dict())
    old_optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    old = WarmupCosineLR(old_optimizer, 10, warmup_num_steps=2, warmup_type="linear", cos_min_ratio=0.1)
    for _ in range(5):
        old_optimizer.step()
        old.step()
    _, from_old = schedule()
    from_old.load_state_dict(old.state_dict())  # {"last_batch_iteration": 4}: what checkpoints held until now
    assert resumed.last_epoch == from_old.last_epoch == run.last_epoch == 5
    for scheduler in (run, resumed, from_old):
        scheduler.step()
    assert resumed.get_last_lr() == from_old.get_last_lr() == run.get_last_lr() == [pytest.approx(
        0.1 + 0.9 * (1 + math.cos(math.pi * 5 / 8)) / 2)]  # the rate of step 7 (of 10, after 2 of warm-up)


def test_a_scheduler_other_than_a_linear_warmup_cosine_is_left_to_deepspeed():
    from pg_deepspeed.distributed.lr_schedule import split_scheduler

    config = {"optimizer": {}, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 3}}}
    assert split_scheduler(config) == (config, None)
    log = {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 5}}}  # DeepSpeed's default: log
    assert split_scheduler(log) == (log, None)


@pytest.mark.parametrize("params, message", [
    ({"warmup_type": "linear"}, "total_num_steps must be a non-negative int, got None"),
    ({"warmup_type": "linear", "total_num_steps": 5, "warmup_max_lr": 1.0}, r"unknown params \['warmup_max_lr'\]"),
])
def test_a_linear_warmup_cosine_the_trainer_cannot_build_is_refused_naming_the_key(params, message):
    from pg_deepspeed.distributed.lr_schedule import split_scheduler

    with pytest.raises(ValueError, match=message):
        split_scheduler({"scheduler": {"type": "WarmupCosineLR", "params": params}})


# ------------------------------------------------------------------------------------- two ranks, ZeRO-3
@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    result = run_deepspeed(SCRIPT, "--mode", "main", "--out", str(out))
    assert result.returncode == 0, result.stdout[-6000:]
    return out, json.loads((out / "main.json").read_text())


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["policy", "reference"])
def test_each_rank_holds_half_of_every_parameter(zero3_run, engine):
    shards_per_rank = zero3_run[1][f"{engine}_shards"]
    assert len(shards_per_rank) == 2
    for shards in shards_per_rank:
        for name, local, full in shards:
            assert local == math.ceil(full / 2), name


@pytest.mark.distributed
def test_policy_is_built_in_the_requested_float32(zero3_run):
    assert zero3_run[1]["policy_dtypes"] == ["torch.float32"]


@pytest.mark.distributed
def test_runs_start_from_the_same_weights(zero3_run):
    assert zero3_run[1]["initial_weights_equal"]


@pytest.mark.distributed
@pytest.mark.parametrize("standard", ["B", "C"])
def test_three_grouped_steps_match_three_standard_steps(zero3_run, standard):
    out, result = zero3_run
    grouped, other = torch.tensor(result["losses"]["A"]), torch.tensor(result["losses"][standard])
    assert grouped.shape == (3, 2)
    assert rel_err(grouped, other) <= 1e-5
    params_grouped, params_other = torch.load(out / "params_A.pt"), torch.load(out / f"params_{standard}.pt")
    for name, value in params_other.items():
        assert rel_err(params_grouped[name], value) <= 1e-5, name


@pytest.mark.distributed
def test_three_steps_moved_every_weight_matrix(zero3_run):
    out, _ = zero3_run
    initial, trained = torch.load(out / "params_initial.pt"), torch.load(out / "params_A.pt")
    assert initial.keys() == trained.keys()
    for name, value in initial.items():
        if value.dim() == 2:
            assert rel_err(trained[name], value) >= 1e-4, name


@pytest.mark.distributed
def test_reference_is_frozen_in_eval_mode_without_optimizer(zero3_run):
    result = zero3_run[1]
    assert result["reference_trainable"] == 0
    assert result["reference_optimizer"] == "DeepSpeedZeRoOffload"  # ZeRO-3's parameter gatherer, no optimizer
    assert not result["reference_lr_scheduler"]
    assert not result["reference_training_mode"]


@pytest.mark.distributed
def test_export_loads_in_plain_transformers_with_the_engines_logits(zero3_run):
    out, result = zero3_run
    saved = torch.load(out / "export_logits.pt")
    model = AutoModelForCausalLM.from_pretrained(out / "export")
    with torch.no_grad():
        logits = model(input_ids=saved["input_ids"]).logits
    assert (logits - saved["logits"]).abs().max().item() <= 1e-5
    assert (out / "export" / "tokenizer.json").is_file()
    trained = torch.load(out / "params_A.pt")  # the engine's weights, gathered
    exported = dict(model.named_parameters())
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[name], value) for name, value in trained.items())
    assert result["export_and_reload"] <= 1e-5  # the export rebuilt sharded by build_model


@pytest.mark.distributed
def test_resumed_step_three_equals_the_uninterrupted_step_three(zero3_run):
    out, main = zero3_run
    result = run_deepspeed(SCRIPT, "--mode", "resume", "--out", str(out))
    assert result.returncode == 0, result.stdout[-6000:]
    resumed = json.loads((out / "resume.json").read_text())
    assert resumed["client_state"] == {"data_position": 4, "step": 2, "sft_step": None}
    assert rel_err(torch.tensor(resumed["losses"][0]), torch.tensor(main["losses"]["A"][2])) <= 1e-6
    uninterrupted, continued = torch.load(out / "params_A.pt"), torch.load(out / "params_resumed.pt")
    for name, value in uninterrupted.items():
        assert rel_err(continued[name], value) <= 1e-6, name


# ------------------------------------------------------------------------------------- model directories, ZeRO-3
DIRS = {  # name -> (family of tests/reference.py, overrides, save_pretrained's max_shard_size)
    "dense-tied": ("qwen2", {"tie_word_embeddings": True}, "50GB"),
    "qwen3-moe": ("qwen3_moe", {}, "50GB"),
    "sharded": ("llama", {}, "100kB"),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Tiny directories saved here by transformers (with the char tokenizer), and one two-rank launcher run of
    tests/dist/load_dirs.py over them."""
    root = tmp_path_factory.mktemp("dirs")
    for name, (family, overrides, shard) in DIRS.items():
        tiny_causal_lm(family, seed=3, **overrides).save_pretrained(root / name, max_shard_size=shard)
        build_char_tokenizer().save_pretrained(root / name)
    result = run_deepspeed("tests/dist/load_dirs.py", "--out", str(root), *(str(root / name) for name in DIRS))
    assert result.returncode == 0, result.stdout[-6000:]
    return root


def test_the_fixture_directories_have_the_formats_under_test(model_dirs):
    assert (model_dirs / "sharded" / "model.safetensors.index.json").is_file()
    # transformers 5 fuses the experts into `experts.gate_up_proj` parameters and saves them one expert at a time:
    # loading must apply its key conversion
    with safe_open(model_dirs / "qwen3-moe" / "model.safetensors", "pt") as handle:
        assert "model.layers.0.mlp.experts.0.gate_proj.weight" in handle.keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in torch.load(model_dirs / "qwen3-moe.pt")["weights"]
    with safe_open(model_dirs / "dense-tied" / "model.safetensors", "pt") as handle:
        assert "lm_head.weight" not in handle.keys()


@pytest.mark.distributed
@pytest.mark.parametrize("name", DIRS)
def test_zero3_load_of_a_directory_gives_the_plain_load_logprobs(model_dirs, name):
    result = torch.load(model_dirs / f"{name}.pt")
    plain = AutoModelForCausalLM.from_pretrained(model_dirs / name).eval()
    prompt_ids, prompt_mask, completion_ids, completion_mask, sizes = random_grpo_batch(LOAD_BATCH_SEED, "left")
    with torch.no_grad():
        expected, _ = padded_completion_logprobs(plain, prompt_ids, prompt_mask, completion_ids, completion_mask, sizes)
    assert (result["logps"] - expected).abs().max().item() <= 1e-5
    for shards in result["shards"]:  # loaded sharded: each rank holds half of every parameter
        for param, local, full in shards:
            assert local == math.ceil(full / 2), param


@pytest.mark.distributed
@pytest.mark.parametrize("name", DIRS)
def test_export_reloads_with_from_pretrained_equal_to_the_gathered_weights(model_dirs, name):
    gathered = torch.load(model_dirs / f"{name}.pt")["weights"]
    export = model_dirs / f"{name}-export"
    reloaded = AutoModelForCausalLM.from_pretrained(export)
    params = dict(reloaded.named_parameters())
    assert params.keys() == gathered.keys()
    for key, value in gathered.items():
        assert torch.equal(params[key], value), key
    assert (export / "model.safetensors.index.json").is_file()  # sharded at 200 kB
    assert (export / "tokenizer.json").is_file() and (export / "generation_config.json").is_file()
    assert reloaded.config.use_cache


# ------------------------------------------------------------------------------------- which checkpoint loads
def fake_checkpoint(save_dir, tag: str, complete: bool, files: dict[str, bytes] | None = None):
    """A tag directory with `files`; `complete` gives it the complete.json that save_checkpoint writes last."""
    tag_dir = save_dir / tag
    tag_dir.mkdir(parents=True)
    for name, data in (files or {"shard.pt": b"x" * 10}).items():
        (tag_dir / name).write_bytes(data)
    if complete:
        _write_manifest(str(tag_dir), 0, 2)
    return tag_dir


def test_the_newest_complete_checkpoint_loads_and_torn_newer_ones_are_named(tmp_path, capsys):
    save_dir = tmp_path / "checkpoints"
    fake_checkpoint(save_dir, "step_2", complete=True)
    fake_checkpoint(save_dir, "step_10", complete=True)
    fake_checkpoint(save_dir, "step_12", complete=False)  # a kill inside the save
    truncated = fake_checkpoint(save_dir, "step_14", complete=True)
    (truncated / "shard.pt").write_bytes(b"x" * 4)  # a file cut short after complete.json was written
    assert latest_checkpoint(str(tmp_path), verbose=True) == str(save_dir / "step_10")  # 10 > 2: by number
    out = capsys.readouterr().out
    assert f"skipping checkpoint {save_dir / 'step_14'}: shard.pt has 4 bytes, complete.json says 10" in out
    assert f"skipping checkpoint {save_dir / 'step_12'}: no complete.json" in out


def test_a_warmup_checkpoint_is_older_than_step_zero(tmp_path):
    save_dir = tmp_path / "checkpoints"
    fake_checkpoint(save_dir, "sft_7", complete=True)
    assert latest_checkpoint(str(tmp_path)) == str(save_dir / "sft_7")
    fake_checkpoint(save_dir, "step_0", complete=True)
    assert latest_checkpoint(str(tmp_path)) == str(save_dir / "step_0")


def test_only_torn_checkpoints_mean_none(tmp_path):
    fake_checkpoint(tmp_path / "checkpoints", "step_4", complete=False)
    assert latest_checkpoint(str(tmp_path)) is None
