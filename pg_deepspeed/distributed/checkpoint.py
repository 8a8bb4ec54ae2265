"""Checkpoints that resume a run exactly and cannot tear: a kill at any moment leaves a loadable newest one.

Layout under ``output_dir/checkpoints``::

    step_6/   DeepSpeed's files (weights, optimizer, scheduler, our client state), rng_state_rank{r}.pt per rank,
              and complete.json, written last
    sft_2/    the same, taken during the supervised warm-up (2 warm-up steps done, before GRPO step 1)
    latest    "step_6": the newest complete checkpoint, for DeepSpeed's own tools (zero_to_fp32.py, load_checkpoint)

A save counts only once every rank has finished writing it. DeepSpeed's ``save_checkpoint`` writes ``latest`` from
rank 0 without waiting for the other ranks' shards, so a kill inside a save could leave ``latest`` naming a torn
checkpoint. We pass ``save_latest=False`` and, after a barrier, rank 0 writes ``complete.json`` (each file and its
size) and then ``latest``, each through a temporary file, fsync and an atomic rename. Loading picks the newest
directory whose ``complete.json`` matches its files, and says which newer ones it skipped and why.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

CHECKPOINTS = "checkpoints"
POINTER = "latest"
MANIFEST = "complete.json"
_TAG = re.compile(r"(step|sft)_(\d+)")
_RNG_FILE = "rng_state_rank{rank}.pt"
_CLIENT_KEY = "pg_deepspeed"  # our client state, apart from the keys DeepSpeed adds to the same dict


def save_checkpoint(
    engine: deepspeed.DeepSpeedEngine, output_dir: str, step: int, client_state: dict, *,
    sft_step: int | None = None, total_limit: int = 0, rng_state: dict | None = None,
) -> str:
    """Save ``output_dir/checkpoints/step_{step}`` (weights, optimizer, scheduler, ``client_state`` + ``step``).

    Collective: every rank must call it. ``client_state`` is stored once (rank 0's copy), so it must agree across
    ranks; each rank's RNG states (``rng_state`` from :func:`rng_state`, default the current ones) go in their
    own file. ``sft_step`` marks a checkpoint taken during the supervised warm-up, before GRPO step 1 (tag
    ``sft_{sft_step}``, older than ``step_0``). ``total_limit`` > 0 keeps only the newest that many complete
    checkpoints. Returns the tag directory. Saving over a complete checkpoint is refused: a kill in the middle
    would tear it.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if sft_step is not None and (step != 0 or not isinstance(sft_step, int) or sft_step < 0):
        raise ValueError(f"a warm-up checkpoint needs step 0 and a non-negative sft_step, got {step}, {sft_step!r}")
    if not isinstance(total_limit, int) or total_limit < 0:
        raise ValueError(f"total_limit must be a non-negative int, got {total_limit!r}")
    save_dir = os.path.join(output_dir, CHECKPOINTS)
    tag = f"step_{step}" if sft_step is None else f"sft_{sft_step}"
    tag_dir = os.path.join(save_dir, tag)
    rank = dist.get_rank()
    if _complete(tag_dir) is None:
        raise ValueError(f"{tag_dir} is a complete checkpoint already; saving over it could tear it")
    start = time.perf_counter()
    if rank == 0 and os.path.isdir(tag_dir):
        shutil.rmtree(tag_dir)  # the remains of a save that a kill interrupted
    dist.barrier()
    os.makedirs(tag_dir, exist_ok=True)
    torch.save(rng_state or current_rng_state(), os.path.join(tag_dir, _RNG_FILE.format(rank=rank)))
    state = {**client_state, "step": step, "sft_step": sft_step}
    engine.save_checkpoint(save_dir, tag=tag, client_state={_CLIENT_KEY: state}, save_latest=False)
    dist.barrier()  # every rank has written and closed its files
    if rank == 0:
        _write_manifest(tag_dir, step, dist.get_world_size())
        _atomic_write(os.path.join(save_dir, POINTER), tag)
        if total_limit:
            _rotate(save_dir, total_limit)
        print(f"[pg_deepspeed] checkpoint {tag} saved in {time.perf_counter() - start:.1f} s", flush=True)
    dist.barrier()
    return tag_dir


def latest_checkpoint(output_dir: str, *, verbose: bool = False) -> str | None:
    """The directory of the newest complete checkpoint under ``output_dir``, or None when there is none.

    Newer directories that are incomplete (a save that a kill interrupted) are skipped; with ``verbose`` each
    skip is printed with its reason.
    """
    save_dir = os.path.join(output_dir, CHECKPOINTS)
    for tag_dir in _tag_dirs(save_dir):
        problem = _complete(tag_dir)
        if problem is None:
            return tag_dir
        if verbose:
            print(f"[pg_deepspeed] skipping checkpoint {tag_dir}: {problem}; falling back to an older one",
                  flush=True)
    return None


def load_checkpoint(engine: deepspeed.DeepSpeedEngine, output_dir: str) -> dict | None:
    """Resume from the newest complete checkpoint: weights, optimizer, scheduler and this rank's RNG states.

    Returns the saved client state (with ``step``), or None when ``output_dir`` has no complete checkpoint.
    """
    tag_dir = latest_checkpoint(output_dir, verbose=dist.get_rank() == 0)
    if tag_dir is None:
        return None
    with open(os.path.join(tag_dir, MANIFEST), encoding="utf-8") as file:
        saved_world = json.load(file)["world_size"]
    if saved_world != dist.get_world_size():
        raise RuntimeError(f"{tag_dir} was saved by {saved_world} ranks, this run has {dist.get_world_size()}")
    load_path, client_state = engine.load_checkpoint(os.path.dirname(tag_dir), tag=os.path.basename(tag_dir))
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    _set_rng_state(torch.load(os.path.join(tag_dir, _RNG_FILE.format(rank=dist.get_rank())), weights_only=False))
    return client_state[_CLIENT_KEY]


def _tag_dirs(save_dir: str) -> list[str]:
    """The checkpoint directories under ``save_dir``, newest first: ``step_N`` by N, then ``sft_K`` by K."""
    if not os.path.isdir(save_dir):
        return []
    order = []
    for name in os.listdir(save_dir):
        if (match := _TAG.fullmatch(name)) and os.path.isdir(os.path.join(save_dir, name)):
            number = int(match.group(2))
            order.append(((number, 1, 0) if match.group(1) == "step" else (0, 0, number), name))
    return [os.path.join(save_dir, name) for _, name in sorted(order, reverse=True)]


def _complete(tag_dir: str) -> str | None:
    """None when ``tag_dir`` holds a complete checkpoint, else why not."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(path):
        return f"no {MANIFEST} (a save did not finish)"
    try:
        with open(path, encoding="utf-8") as file:
            files = json.load(file)["files"]
    except (ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST} is unreadable ({error})"
    for name, size in files.items():
        full = os.path.join(tag_dir, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        if os.path.getsize(full) != size:
            return f"{name} has {os.path.getsize(full)} bytes, {MANIFEST} says {size}"
    return None


def _write_manifest(tag_dir: str, step: int, world_size: int) -> None:
    """Fsync every file of ``tag_dir`` (rank 0, after the barrier), then record them and their sizes."""
    files = {}
    for root, _, names in os.walk(tag_dir):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as file:
                os.fsync(file.fileno())
            files[os.path.relpath(full, tag_dir)] = os.path.getsize(full)
    _atomic_write(os.path.join(tag_dir, MANIFEST),
                  json.dumps({"step": step, "world_size": world_size, "files": files}, indent=1))


def _atomic_write(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` so that a reader (or a kill) sees the old content or the new, never a part."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _rotate(save_dir: str, total_limit: int) -> None:
    """Keep the newest ``total_limit`` complete checkpoints; delete older ones, complete or torn."""
    kept = 0
    for tag_dir in _tag_dirs(save_dir):
        if kept < total_limit:
            kept += _complete(tag_dir) is None
        else:
            shutil.rmtree(tag_dir)


def current_rng_state() -> dict:
    """This process's python, numpy, torch (and CUDA) RNG states, as a checkpoint stores them."""
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
