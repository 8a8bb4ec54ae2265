"""GRPO training with prefix-grouped log-probs on DeepSpeed.

    deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero3_cpu.json            # the default job
    deepspeed launch/train.py --ds_config ds_configs/zero3.json --model /models/qwen2.5-1.5b \\
        --dataset data/train.jsonl --dtype bfloat16 --prompts_per_device 2 --num_generations 16
    python launch/train.py --help

A configuration error found before any work (a bad option, a --model path with no model, a dataset row without a
prompt, a DeepSpeed config that contradicts the options) prints one line and exits with status 2; a failure
after that keeps its traceback.
"""
import sys

from transformers import HfArgumentParser

from pg_deepspeed.collectives import end_process
from pg_deepspeed.grpo.args import DataArguments, GRPOArguments, ModelArguments, TrainArguments
from pg_deepspeed.grpo.setup_checks import prepare
from pg_deepspeed.grpo.trainer import run

if __name__ == "__main__":
    parser = HfArgumentParser((ModelArguments, DataArguments, GRPOArguments, TrainArguments))
    try:
        setup = prepare(*parser.parse_args_into_dataclasses())
    except (ValueError, TypeError, OSError, ImportError) as error:  # what prepare() raises for bad configuration
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    run(setup)
    end_process()  # run() has shut the process groups down: this only skips the teardown
