"""Command-line arguments of `launch/train.py`, as dataclasses read by `transformers.HfArgumentParser`."""
from __future__ import annotations

from dataclasses import dataclass, field

from pg_deepspeed.grpo.rewards import DEFAULT_FORMAT_PATTERN

DEFAULT_CURRICULUM_START = 16  # tokens: the built-in tasks' first prompts, when no --curriculum_start_length is given
DEFAULT_SFT_WARMUP_STEPS = 60  # supervised steps on those prompts before GRPO, when a curriculum runs


@dataclass
class ModelArguments:
    model: str = field(
        default="tiny-qwen2",
        metadata={"help": "A local Hugging Face model directory, or a tiny preset name (tiny-qwen2, tiny-llama)."},
    )
    dtype: str = field(default="float32", metadata={"help": "Parameter dtype: float32, bfloat16 or float16."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    attention_backend: str = field(
        default="auto", metadata={"help": "Prefix-grouped attention kernel: auto, flash_attn_3, flash_attn, torch or cpu."}
    )


@dataclass
class DataArguments:
    task: str = field(
        default="needle",
        metadata={"help": "Used without --dataset: a built-in synthetic task (needle, majority, kv_retrieval), or "
                  "reasoning_gym:<name>, a generator of the reasoning-gym package (e.g. reasoning_gym:needle_haystack) "
                  "scored by its own scorer."},
    )
    task_config: str | None = field(
        default=None,
        metadata={"help": "A reasoning_gym:<name> task's generator options, a JSON object, e.g. "
                  "'{\"min_num_statements\": 50}' (unset: its defaults; seed and size are the run's)."},
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "A local dataset: a .jsonl/.json/.parquet/.csv file, or a folder datasets.load_dataset or "
                  "load_from_disk opens. Its `prompt` is a string or a list of {role, content} messages."},
    )
    eval_dataset: str | None = field(
        default=None, metadata={"help": "A held-out local dataset (same columns as --dataset) for the evaluation."}
    )
    eval_examples: int = field(
        default=0,
        metadata={"help": "Evaluate on this many held-out examples: rows of --eval_dataset (0 = all of them), else "
                  "rows held out of --dataset (never trained on), else examples of the built-in or reasoning_gym task "
                  "no step reads."},
    )
    answer_column: str = field(default="answer", metadata={"help": "The --dataset column that holds the answers."})
    system_prompt: str | None = field(
        default=None, metadata={"help": "Replaces the conversation's system message, or adds one (needs a chat template)."}
    )
    no_chat_template: bool = field(
        default=False,
        metadata={"help": "Feed plain-text prompts as text even when the tokenizer has a chat template (by default "
                  "they become one user message); conversations are then refused."},
    )
    prompt_length: int = field(
        default=256, metadata={"help": "Approximate prompt length in tokens for the synthetic tasks."}
    )
    curriculum_start_length: int | None = field(
        default=None,
        metadata={"help": "Built-in tasks: prompts grow by doubling from this length to --prompt_length over the "
                  f"first --curriculum_fraction of the steps (unset: {DEFAULT_CURRICULUM_START}; 0 = none; not "
                  "with --dataset or a reasoning_gym task)."},
    )
    curriculum_fraction: float = field(
        default=0.5, metadata={"help": "Share of --max_steps over which the curriculum grows the prompts."}
    )


@dataclass
class GRPOArguments:
    num_generations: int = field(default=8, metadata={"help": "G: completions sampled per prompt."})
    max_new_tokens: int = field(default=4, metadata={"help": "Longest completion, in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (also applied to log-probs)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    advantage: str = field(default="grpo", metadata={"help": "Advantage estimator: grpo, dr_grpo or rloo."})
    loss_aggregation: str = field(
        default="token-mean",
        metadata={"help": "token-mean, seq-mean-token-mean, or dr_grpo (sum over tokens / (N * max_new_tokens))."},
    )
    epsilon: float = field(default=0.2, metadata={"help": "Lower clip range of the policy ratio."})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "Upper clip range (defaults to --epsilon; DAPO uses 0.28)."}
    )
    beta: float = field(
        default=0.0,
        metadata={"help": "KL coefficient (k3) to the frozen reference: the model as loaded, before any SFT warm-up; "
                  "built only if > 0."},
    )
    num_iterations: int = field(default=1, metadata={"help": "Policy updates per rollout batch."})
    reward_fn: list[str] | None = field(
        default=None,
        metadata={"help": "One or more reward functions, space-separated: built-ins (exact_match, numeric_match, "
                  "math_accuracy, format, reasoning_gym) or module:function, each called as f(prompts, completions, "
                  "answers, **columns) -> list of floats; the reward is their weighted sum (unset: the task's own, "
                  "reasoning_gym for a reasoning_gym task, exact_match for a --dataset)."},
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "One weight per --reward_fn function, in order (unset: 1.0 each)."},
    )
    format_pattern: str = field(
        default=DEFAULT_FORMAT_PATTERN,
        metadata={"help": "Regex of a well-formed answer, matched with re.DOTALL: the `format` reward is 1.0 where it "
                  "is found in the completion; math_accuracy scores the first group of its last match (the answer "
                  "tag's content), or the whole completion where it is not found."},
    )
    format_reward: float = field(
        default=0.2,
        metadata={"help": "Built-in tasks' default reward: reward for a well-formed (wrong) digit; 1.0 when correct."},
    )
    no_prefix_grouping: bool = field(
        default=False, metadata={"help": "Run the standard repeated-prompt forward (for A/B comparisons)."}
    )
    rollout_engine: str = field(
        default="hf",
        metadata={"help": "What samples the rollout: hf (the built-in prefix-once decoder on the trained model, "
                  "--rollout_cache and --rollout_gather) or vllm (a vLLM engine on every rank, colocated, its weights "
                  "synced from the policy every step; needs the vllm extra; docs/trainer.md)."},
    )
    vllm_tensor_parallel_size: int = field(
        default=1,
        metadata={"help": "--rollout_engine vllm: ranks per engine (tensor parallel; consecutive ranks of one node, each "
                  "holding 1/size of the engine's weights and KV cache, sample their prompts together)."}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata={"help": "--rollout_engine vllm: the share of the device's memory each engine reserves for its "
                  "weights and KV cache (on CPU, of the CPU memory; VLLM_CPU_KVCACHE_SPACE=<GiB> sizes the KV cache "
                  "instead)."},
    )
    vllm_sleep: str = field(
        default="auto",
        metadata={"help": "--rollout_engine vllm: put the engine to sleep after each rollout (vLLM's sleep mode, level "
                  "2: its KV cache and weights released for the update) and wake it for the next weight sync: on, "
                  "off, or auto (on for CUDA or ROCm GPUs; off elsewhere, where on is refused). The memory "
                  "freed is logged as vllm_sleep_freed_bytes."},
    )
    vllm_enforce_eager: bool = field(
        default=False,
        metadata={"help": "--rollout_engine vllm: no torch.compile or graphs (starts in seconds, decodes slower)."},
    )
    max_rollout_logprob_diff: float | None = field(
        default=None,
        metadata={"help": "--rollout_engine vllm: stop the run when the mean |trainer log-prob - vLLM log-prob| over "
                  "a step's completion tokens exceeds this: the engine samples weights the trainer does not have (a "
                  "broken weight sync). Unset: 1e-3 in float32, 0.5 in bfloat16/float16 (measured: docs/trainer.md)."},
    )
    rollout_importance_correction: bool = field(
        default=False,
        metadata={"help": "--rollout_engine vllm: weight each token's policy-gradient term by the truncated "
                  "importance ratio min(pi_trainer / pi_vllm, --rollout_importance_cap) of its sampled token (TIS), "
                  "for the trainer/sampler mismatch that remains (bf16)."},
    )
    rollout_importance_cap: float = field(
        default=2.0, metadata={"help": "The cap C of --rollout_importance_correction's ratio (TIS uses 2)."}
    )
    rollout_cache: str = field(
        default="shared",
        metadata={"help": "Decode cache of the rollout: shared (each prompt's K/V once per group, merged by "
                  "log-sum-exp) or repeat (the prompt's K/V repeated to its G samples; for A/B comparisons)."},
    )
    rollout_prefill_chunk: int = field(
        default=2048,
        metadata={"help": "Prompt tokens per prefill forward of the rollout, the micro-batch's prompts together "
                  "(each forward takes this // prompts columns of every prompt): bounds the prefill's activations and "
                  "attention mask to one chunk's (0 = the whole prompt in one forward)."},
    )
    rollout_gather: str = field(
        default="full",
        metadata={"help": "ZeRO-3 rollout weights: full (gathered once per rollout; needs the whole model in memory "
                  "on every rank) or per_layer (ZeRO-3's per-layer gathering at every token)."},
    )
    logprob_chunk_size: int = field(
        default=512,
        metadata={"help": "Completion tokens whose [tokens, vocabulary] logits the LM head computes at once in every "
                  "log-prob pass (policy, old, reference, warm-up): bounds that pass's logits memory."},
    )
    min_shared_preamble: int = field(
        default=32,
        metadata={"help": "Share the tokens every prompt of a micro-batch begins with (a system prompt, few-shot "
                  "preamble) once per micro-batch when there are at least this many (0 = never)."},
    )
    environment: str | None = field(
        default=None,
        metadata={"help": "Multi-turn rollouts: an environment class, module:Class (constructed with no arguments, one "
                  "per conversation, with reset(example) -> messages and step(messages) -> (observation messages, "
                  "reward or None, done)), or a built-in name; the model's turns alternate with its observations "
                  "(docs/multiturn.md)."},
    )
    max_turns: int = field(
        default=4, metadata={"help": "--environment: assistant turns per conversation at most."}
    )
    branching: str | None = field(
        default=None,
        metadata={"help": "--environment: sample the conversations as a tree, k1,k2,...: k1 continuations of the "
                  "first assistant turn, k2 of each of those, ...; their product is --num_generations. Unset: G "
                  "independent conversations (the same as --branching G). Shared turns are computed once."},
    )
    max_completion_tokens: int | None = field(
        default=None,
        metadata={"help": "--environment (required there): tokens after the prompt in all, assistant turns, "
                  "observations and the template's text between them; a conversation that reaches it ends. Bounds "
                  "the rows' length, so memory, and what the model's positions must cover."},
    )
    advantage_level: str = field(
        default="sequence",
        metadata={"help": "sequence (each completion's --advantage on all its tokens) or node (each token's from the "
                  "tree of what the group's completions share: the mean reward of the completions below it against "
                  "its parent's and the group's, after TreeRL; docs/multiturn.md)."},
    )


@dataclass
class TrainArguments:
    ds_config: str = field(metadata={"help": "DeepSpeed JSON config (required), e.g. ds_configs/zero3_cpu.json."})
    output_dir: str = field(default="outputs/grpo", metadata={"help": "Metrics, checkpoints, export and plots."})
    max_steps: int = field(default=400, metadata={"help": "Rollout steps to train."})
    prompts_per_device: int = field(default=4, metadata={"help": "Prompts (groups) per micro-batch per rank."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    sequence_parallel_size: int = field(
        default=1,
        metadata={"help": "Ranks that share each packed micro-batch along the sequence (DeepSpeed Ulysses); the "
                  "data-parallel size is world / this. Must divide the ranks and the attention heads."},
    )
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_steps: int = field(default=5, metadata={"help": "Linear warm-up optimizer steps before cosine decay."})
    sft_warmup_steps: int | None = field(
        default=None,
        metadata={"help": "Supervised steps on the task's answers before GRPO (0 = none; unset: "
                  f"{DEFAULT_SFT_WARMUP_STEPS} on the curriculum's first prompts when a curriculum runs, else 0)."},
    )
    max_nonfinite_steps: int = field(
        default=3,
        metadata={"help": "Stop the run after this many consecutive optimizer steps whose loss or gradient norm was "
                  "NaN or inf on some rank (each is skipped on every rank; a checkpoint never holds such weights)."},
    )
    eval_steps: int = field(
        default=0,
        metadata={"help": "With an eval set: evaluate every N GRPO steps too (always at step 0 and at the end)."},
    )
    per_device_eval_batch_size: int = field(
        default=0,
        metadata={"help": "Held-out prompts each rank decodes at once in an evaluation (0 = --prompts_per_device). "
                  "Each holds a prompt cache of its own (a rollout's G rows share one): more costs prompt memory."},
    )
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={"help": "Trackers besides metrics.jsonl (always written): tensorboard, wandb (offline unless "
                  "WANDB_MODE or an API key and a network say otherwise), jsonl (only the files)."},
    )
    wandb_project: str = field(default="pg_deepspeed", metadata={"help": "The W&B project of --report_to wandb."})
    log_completions_steps: int = field(
        default=10,
        metadata={"help": "Every N steps, append every sampled prompt (as the model saw it), completion and reward of "
                  "all replicas to output_dir/completions.jsonl (0 = never)."},
    )
    save_steps: int = field(default=0, metadata={"help": "Save a checkpoint every N steps (0 = only at the end)."})
    save_total_limit: int = field(
        default=0, metadata={"help": "Keep only the newest N complete checkpoints (0 = keep all)."}
    )
    resume: bool = field(
        default=False, metadata={"help": "Continue from the newest complete checkpoint in --output_dir."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for weights, data and sampling."})
    export: bool = field(default=True, metadata={"help": "Write a Hugging Face export to output_dir/export at the end."})
    local_rank: int = field(default=-1, metadata={"help": "Set by the deepspeed launcher."})
