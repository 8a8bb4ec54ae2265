"""Everything `launch/train.py` checks before any process group or weights exist: :func:`prepare` returns the
:class:`TrainingSetup` that `trainer.run` builds and trains from, or raises ValueError, TypeError, OSError or
ImportError naming the culprit (printed as one line, exit status 2)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from pg_deepspeed.attention import check_backend_name
from pg_deepspeed.distributed.ds_config import dtype_name, load_ds_config
from pg_deepspeed.distributed.engines import check_patchable, load_config, load_tokenizer
from pg_deepspeed.distributed.lr_schedule import split_scheduler
from pg_deepspeed.distributed.parallel_dims import ParallelDims, ranks_per_node
from pg_deepspeed.distributed.rollout_weights import GATHER_MODES
from pg_deepspeed.distributed.sequence_parallel import gradient_scale
from pg_deepspeed.generation.sampling import CACHE_MODES, DEFAULT_PREFILL_CHUNK
from pg_deepspeed.generation.vllm_engine import (check_tensor_parallel, check_vllm_model, logprobs_mode,
                                                 sleep_mode_available, vllm_missing)
from pg_deepspeed.grpo.advantages import ESTIMATORS
from pg_deepspeed.grpo.args import (DEFAULT_CURRICULUM_START, DEFAULT_SFT_WARMUP_STEPS, DataArguments, GRPOArguments,
                                    ModelArguments, TrainArguments)
from pg_deepspeed.grpo.chat_turns import ChatTurns
from pg_deepspeed.grpo.data import SFT_OFFSET, Curriculum, FileDataset, PromptSource, build_source, longest_prompt
from pg_deepspeed.grpo.environments import (ENVIRONMENT_REWARD, EnvironmentFault, checked_reset, load_environment,
                                            with_environment)
from pg_deepspeed.grpo.evaluation import EvalSet, held_out
from pg_deepspeed.grpo.gym_tasks import ReasoningGymTask, is_reasoning_gym
from pg_deepspeed.grpo.loss import AGGREGATIONS
from pg_deepspeed.grpo.multiturn import Conversations, MultiTurnOptions, example_row, parse_branching
from pg_deepspeed.grpo.prompts import PromptFormat
from pg_deepspeed.grpo.tracking import check_report_to
from pg_deepspeed.grpo.rewards import RewardFunctions, check_reward_options, resolve_rewards


@dataclass
class TrainingSetup:
    """What the cheap set-up checks established."""

    model_args: ModelArguments
    data_args: DataArguments
    grpo: GRPOArguments
    train: TrainArguments
    dims: ParallelDims
    tokenizer: PreTrainedTokenizerBase
    prompt_format: PromptFormat  # how prompts become token ids: the chat template, or plain text
    config: PretrainedConfig
    source: PromptSource
    eval_set: EvalSet | None  # the held-out examples (evaluation.py), or None
    rewards: RewardFunctions
    ds_config: dict
    max_length: int  # the longest prompt + max_new_tokens: the patch accepts windows at least this long
    # --environment: the environment class, the conversations' limits, the chat template's turn rule
    environment: type | None = None
    multiturn: MultiTurnOptions | None = None
    chat_turns: ChatTurns | None = None

    @property
    def conversations(self) -> Conversations | None:
        """--environment: what the rollout and the evaluation converse with; None for single-turn runs."""
        return None if self.environment is None else Conversations(self.environment, self.chat_turns, self.multiturn)

    def options(self) -> dict:
        """Every option of the run by name (a tracker's config)."""
        return {k: v for args in (self.model_args, self.data_args, self.grpo, self.train) for k, v in vars(args).items()}


def prepare(model_args: ModelArguments, data_args: DataArguments, grpo: GRPOArguments,
            train: TrainArguments) -> TrainingSetup:
    """Check the options, the model directory, the data and the DeepSpeed config; nothing heavy."""
    curriculum = curriculum_of(data_args, train.max_steps)
    if train.sft_warmup_steps is None:  # unset: a supervised start on the curriculum's shortest prompts
        train = replace(train, sft_warmup_steps=DEFAULT_SFT_WARMUP_STEPS if curriculum is not None else 0)
    check_args(model_args, grpo, train)
    tokenizer = load_tokenizer(model_args.model)
    config = load_config(model_args.model)
    try:
        dims = ParallelDims(int(os.environ.get("WORLD_SIZE", "1")), train.sequence_parallel_size)
        dims.check_model(config)
    except ValueError as error:
        raise ValueError(f"--{error}") from None
    source = build_source(data_args.task, data_args.dataset, data_args.prompt_length, train.seed, curriculum,
                          examples_per_step=dims.dp * train.prompts_per_device * train.gradient_accumulation_steps,
                          answer_column=data_args.answer_column, task_config=data_args.task_config)
    if isinstance(source, ReasoningGymTask) and train.sft_warmup_steps > 0 and not source.example(SFT_OFFSET).answer:
        raise ValueError(f"--sft_warmup_steps {train.sft_warmup_steps}: --task {source.name} has no reference answers "
                         "to imitate (its scorer judges each completion); leave it 0")
    prompt_format = PromptFormat(tokenizer, data_args.system_prompt, use_chat_template=not data_args.no_chat_template)
    multiturn = check_multiturn(grpo, train)
    environment = load_environment(grpo.environment) if grpo.environment is not None else None
    after_prompt = grpo.max_new_tokens if multiturn is None else multiturn.max_completion_tokens  # tokens at most
    max_length = check_prompt_lengths(prompt_format, source, config, after_prompt)
    source, eval_set = held_out(data_args, source, train.seed)
    if eval_set is not None:
        max_length = max(max_length, check_eval_lengths(prompt_format, eval_set, config, after_prompt))
    chat_turns = ChatTurns(prompt_format, getattr(environment, "tools", None)) if environment else None
    if environment is not None:  # what the rollout's first prompts really are: the environment's reset
        max_length = max(max_length, check_environment_reset(grpo.environment, environment, chat_turns, source,
                                                             eval_set, config, after_prompt))
    check_patchable(config, max_length)
    if grpo.rollout_engine == "vllm":
        try:
            check_vllm_model(config)
        except ValueError as error:
            raise ValueError(f"--rollout_engine vllm: {error}; use --rollout_engine hf") from None
        try:
            check_tensor_parallel(config, grpo.vllm_tensor_parallel_size, dims.world, ranks_per_node(dims.world))
        except ValueError as error:
            raise ValueError(f"--vllm_tensor_parallel_size {error}") from None
        if grpo.vllm_sleep == "on" and not sleep_mode_available():
            raise ValueError("--vllm_sleep on: the engine sleeps on CUDA (or ROCm) GPUs only, and this platform is "
                             "not one (vLLM's CPU build has no sleep mode); use --vllm_sleep auto or off")
    rewards = resolve_rewards(grpo.reward_fn, grpo.reward_weights, synthetic=data_args.dataset is None,
                              format_reward=grpo.format_reward, format_pattern=grpo.format_pattern,
                              task_scorer=source.score_answer if isinstance(source, ReasoningGymTask) else None,
                              task=source.name if data_args.dataset is None else "")
    filled = ()  # columns the rollout fills in
    if environment is not None:  # the environment's reward (such a column), with --reward_fn's if named
        rewards = with_environment(rewards if grpo.reward_fn else None)
        filled = (ENVIRONMENT_REWARD,)
    rewards.check_columns([*getattr(source, "extra_columns", ()), *filled], where=source.name)
    if eval_set is not None:
        rewards.check_columns([*eval_set.examples[0].columns, *filled], where=eval_set.name)
    ds_config = load_ds_config(
        train.ds_config, micro_batch_size=train.prompts_per_device,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        world_size=dims.world, hidden_size=config.hidden_size, dtype=model_args.dtype,
        lr=train.learning_rate, weight_decay=train.weight_decay, warmup_steps=train.warmup_steps,
        total_steps=train.sft_warmup_steps + train.max_steps * grpo.num_iterations,
        sequence_parallel_size=dims.sp,
    )
    try:
        split_scheduler(ds_config)  # a schedule the policy's engine could not build, refused before any engine
    except ValueError as error:
        raise ValueError(f"--ds_config {train.ds_config}: {error}") from None
    try:
        gradient_scale(ds_config, dims.sp)
    except ValueError as error:
        raise ValueError(f"--sequence_parallel_size {dims.sp}: {error}") from None
    return TrainingSetup(model_args, data_args, grpo, train, dims, tokenizer, prompt_format, config, source, eval_set,
                         rewards, ds_config, max_length, environment, multiturn, chat_turns)


def check_args(model: ModelArguments, grpo: GRPOArguments, train: TrainArguments) -> None:
    """Refuse contradictory or impossible settings."""
    if not os.path.isfile(train.ds_config):
        raise FileNotFoundError(f"--ds_config {train.ds_config!r} does not exist")
    try:
        check_backend_name(model.attention_backend)
    except ValueError as error:
        raise ValueError(f"--attention_backend: {error}") from None
    try:
        dtype_name(model.dtype)
    except ValueError as error:
        raise ValueError(f"--{error}") from None
    choices = (("advantage", ESTIMATORS), ("loss_aggregation", AGGREGATIONS), ("rollout_cache", CACHE_MODES),
               ("rollout_gather", GATHER_MODES))
    for name, allowed in choices:
        if getattr(grpo, name) not in allowed:
            raise ValueError(f"--{name} must be one of {allowed}, got {getattr(grpo, name)!r}")
    if grpo.num_generations < 2 and grpo.advantage in ("grpo", "rloo"):
        raise ValueError(f"--num_generations must be >= 2 for --advantage {grpo.advantage} (got {grpo.num_generations})")
    for name in ("max_new_tokens", "num_iterations", "logprob_chunk_size", "prompts_per_device",
                 "gradient_accumulation_steps", "max_steps", "max_nonfinite_steps"):
        value = getattr(grpo, name, getattr(train, name, None))
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    for name in ("save_steps", "save_total_limit", "sft_warmup_steps", "log_completions_steps", "eval_steps",
                 "per_device_eval_batch_size"):
        if getattr(train, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(train, name)}")
    if not 0.0 < grpo.top_p <= 1.0:
        raise ValueError(f"--top_p must be in (0, 1], got {grpo.top_p}")
    if grpo.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {grpo.temperature}")
    if grpo.beta < 0:
        raise ValueError(f"--beta must be >= 0, got {grpo.beta}")
    check_report_to(train.report_to)
    if grpo.rollout_prefill_chunk < 0:
        raise ValueError(f"--rollout_prefill_chunk must be >= 0 (0 = the whole prompt at once), "
                         f"got {grpo.rollout_prefill_chunk}")
    if grpo.min_shared_preamble < 0:
        raise ValueError(f"--min_shared_preamble must be >= 0 (0 = never), got {grpo.min_shared_preamble}")
    check_reward_options(grpo.reward_fn, grpo.reward_weights, grpo.format_pattern)
    check_rollout_engine(grpo, train)


ADVANTAGE_LEVELS = ("sequence", "node")


def check_multiturn(grpo: GRPOArguments, train: TrainArguments) -> MultiTurnOptions | None:
    """--environment, --max_turns, --branching, --max_completion_tokens and --advantage_level agree with each other
    and with G; returns the conversations' limits (None without --environment)."""
    if grpo.advantage_level not in ADVANTAGE_LEVELS:
        raise ValueError(f"--advantage_level must be one of {ADVANTAGE_LEVELS}, got {grpo.advantage_level!r}")
    if grpo.advantage_level == "node" and grpo.no_prefix_grouping:
        raise ValueError("--advantage_level node reads the tree of what completions share, which "
                         "--no_prefix_grouping does not build: drop one of them")
    levels = parse_branching(grpo.branching if grpo.branching is not None else grpo.num_generations)
    if math.prod(levels) != grpo.num_generations:
        raise ValueError(f"--branching {grpo.branching} samples {math.prod(levels)} conversations per prompt but "
                         f"--num_generations is {grpo.num_generations}: make them agree")
    if grpo.environment is None:
        if len(levels) > 1:
            raise ValueError(f"--branching {grpo.branching} branches at turn boundaries: it needs --environment (a "
                             "single-turn rollout has one assistant turn)")
        if grpo.max_completion_tokens is not None:
            raise ValueError("--max_completion_tokens bounds a multi-turn conversation: it needs --environment (a "
                             "single-turn completion is bounded by --max_new_tokens)")
        return None
    if grpo.max_completion_tokens is None:
        raise ValueError("--environment needs --max_completion_tokens: the tokens after the prompt in all (turns, "
                         "observations, template text), which bound the rows' memory and the positions they reach")
    if train.sequence_parallel_size > 1 and grpo.rollout_engine == "vllm":
        raise ValueError("--environment with --rollout_engine vllm and --sequence_parallel_size > 1: vLLM refuses "
                         "sequence parallelism (see check_rollout_engine)")
    return MultiTurnOptions(grpo.max_turns, levels, grpo.max_new_tokens, grpo.max_completion_tokens)


def curriculum_of(data: DataArguments, max_steps: int) -> Curriculum | None:
    """The prompt-length curriculum the options ask for. Unset, the built-in tasks grow from
    DEFAULT_CURRICULUM_START tokens (when --prompt_length is longer), and a --dataset or a reasoning-gym task has
    none (asking for one with a reasoning-gym task is refused); 0 turns it off."""
    start = data.curriculum_start_length
    reasoning_gym = data.dataset is None and is_reasoning_gym(data.task)
    if start is None:
        if data.dataset is not None or reasoning_gym or data.prompt_length <= DEFAULT_CURRICULUM_START:
            return None
        start = DEFAULT_CURRICULUM_START
    if start == 0:
        return None
    if reasoning_gym:
        raise ValueError(f"--curriculum_start_length {start}: the curriculum grows the built-in synthetic tasks' "
                         f"prompts; --task {data.task}'s are its generator's (their difficulty is --task_config's; "
                         "leave it unset or 0)")
    if not 0.0 < data.curriculum_fraction <= 1.0:
        raise ValueError(f"--curriculum_fraction must be in (0, 1], got {data.curriculum_fraction}")
    try:
        return Curriculum(start, data.prompt_length, steps=max(1, round(data.curriculum_fraction * max_steps)))
    except ValueError as error:
        raise ValueError(f"--curriculum_start_length {start} (--prompt_length {data.prompt_length}): {error}") from None


def check_prompt_lengths(prompt_format: PromptFormat, source: PromptSource, config, max_new_tokens: int) -> int:
    """The longest prompt as the model sees it + ``max_new_tokens`` (the run's longest sequence); refused past the
    model's positions, naming the dataset row."""
    limit = getattr(config, "max_position_embeddings", None)
    longest, index = longest_prompt(prompt_format, source)
    if limit is not None and longest + max_new_tokens > limit:
        where = f"--dataset {source.path!r} row {index}" if isinstance(source, FileDataset) else \
            f"prompt {index} of {source.name}"
        raise ValueError(f"{where}: the prompt is {longest} tokens; with --max_new_tokens {max_new_tokens} it exceeds "
                         f"the model's max_position_embeddings ({limit})")
    return longest + max_new_tokens


def check_environment_reset(spec: str, environment: type, turns: ChatTurns, source: PromptSource,
                            eval_set: EvalSet | None, config, after_prompt: int) -> int:
    """--environment: a fresh environment reset, as the rollout resets it, on the first training example and the first
    held-out one; returns the longest of those prompts (the template's rendering of its messages) + `after_prompt`.
    A reset that fails (an environment that cannot read the data: the calculator given a conversation) or a prompt
    past the model's positions is refused in one line naming --environment and the example, before any engine is
    built. Only these examples are reset: an environment's prompt of another row may still be longer."""
    limit = getattr(config, "max_position_embeddings", None)
    cases = [("the first training example", source.example(0))]
    if eval_set is not None:
        cases.append((f"{eval_set.name}, example 0", eval_set.examples[0]))
    longest = 0
    for where, example in cases:
        try:
            length = len(turns.prompt_ids(turns.first_messages(checked_reset(environment(), example_row(example),
                                                                             where))))
        except (EnvironmentFault, ValueError) as error:
            raise ValueError(f"--environment {spec!r}: {error}") from None
        if limit is not None and length + after_prompt > limit:
            raise ValueError(f"--environment {spec!r}: its prompt for {where} is {length} tokens; with "
                             f"--max_completion_tokens {after_prompt} it exceeds the model's max_position_embeddings "
                             f"({limit})")
        longest = max(longest, length)
    return longest + after_prompt


def check_eval_lengths(prompt_format: PromptFormat, eval_set: EvalSet, config, max_new_tokens: int) -> int:
    """The longest held-out prompt + ``max_new_tokens``; an example past the model's positions is refused by index."""
    limit = getattr(config, "max_position_embeddings", None)
    longest = 0
    for i, example in enumerate(eval_set.examples):
        try:
            length = len(prompt_format.token_ids(example.prompt))
        except ValueError as error:
            raise ValueError(f"{eval_set.name}, example {i}: {error}") from None
        if limit is not None and length + max_new_tokens > limit:
            raise ValueError(f"{eval_set.name}, example {i}: the prompt is {length} tokens; with --max_new_tokens "
                             f"{max_new_tokens} it exceeds the model's max_position_embeddings ({limit})")
        longest = max(longest, length)
    return longest + max_new_tokens


ROLLOUT_ENGINES = ("hf", "vllm")
VLLM_SLEEP = ("auto", "on", "off")


def check_rollout_engine(grpo: GRPOArguments, train: TrainArguments) -> None:
    """Refuse --rollout_engine vllm where it cannot serve the run (vLLM missing, sequence parallelism, sampling options
    whose log-probs vLLM cannot return) and the built-in engine's options set beside it; cheap (vLLM not imported)."""
    if grpo.rollout_engine not in ROLLOUT_ENGINES:
        raise ValueError(f"--rollout_engine must be one of {ROLLOUT_ENGINES}, got {grpo.rollout_engine!r}")
    if grpo.rollout_engine != "vllm":
        if grpo.rollout_importance_correction:
            raise ValueError("--rollout_importance_correction corrects for vLLM's sampling: it needs "
                             "--rollout_engine vllm (the built-in engine samples with the trainer's weights)")
        return
    missing = vllm_missing()
    if missing is not None:
        raise ImportError(f"--rollout_engine vllm: {missing}")
    if train.sequence_parallel_size > 1:
        raise ValueError(f"--rollout_engine vllm with --sequence_parallel_size {train.sequence_parallel_size}: the "
                         "engine serves data-parallel ranks only; use --rollout_engine hf")
    if grpo.vllm_sleep not in VLLM_SLEEP:
        raise ValueError(f"--vllm_sleep must be one of {VLLM_SLEEP}, got {grpo.vllm_sleep!r}")
    if not grpo.vllm_tensor_parallel_size >= 1:
        raise ValueError(f"--vllm_tensor_parallel_size must be >= 1, got {grpo.vllm_tensor_parallel_size}")
    if not grpo.rollout_importance_cap >= 1.0:
        raise ValueError(f"--rollout_importance_cap must be >= 1, got {grpo.rollout_importance_cap}")
    if not 0.0 < grpo.vllm_gpu_memory_utilization <= 1.0:
        raise ValueError(f"--vllm_gpu_memory_utilization must be in (0, 1], got {grpo.vllm_gpu_memory_utilization}")
    if grpo.max_rollout_logprob_diff is not None and not grpo.max_rollout_logprob_diff > 0:
        raise ValueError(f"--max_rollout_logprob_diff must be > 0, got {grpo.max_rollout_logprob_diff}")
    try:
        logprobs_mode(grpo.temperature, grpo.top_p)
    except ValueError as error:
        raise ValueError(f"--rollout_engine vllm: {error}; set --temperature 1 or --top_p 1") from None
    built_in = {"rollout_cache": "shared", "rollout_gather": "full", "rollout_prefill_chunk": DEFAULT_PREFILL_CHUNK}
    for name, default in built_in.items():
        if getattr(grpo, name) != default:
            raise ValueError(f"--{name} is an option of --rollout_engine hf; vLLM's engine has its own cache "
                             "(leave it unset)")
