"""GRPO training with prefix-grouped log-probs on DeepSpeed.

    deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero3_cpu.json            # the default job
    deepspeed launch/train.py --ds_config ds_configs/zero3.json --model /models/qwen2.5-1.5b \\
        --dataset data/train.jsonl --dtype bfloat16 --prompts_per_device 2 --num_generations 16
    python launch/train.py --help
"""
from transformers import HfArgumentParser

from pg_deepspeed.grpo.args import DataArguments, GRPOArguments, ModelArguments, TrainArguments
from pg_deepspeed.grpo.trainer import train

if __name__ == "__main__":
    parser = HfArgumentParser((ModelArguments, DataArguments, GRPOArguments, TrainArguments))
    train(*parser.parse_args_into_dataclasses())
