#!/usr/bin/env bash
# One node's DeepSpeed launcher; grpo.sbatch starts one per node with `srun --ntasks-per-node=1`.
#
#   launch_node.sh HOSTFILE MASTER_ADDR MASTER_PORT SCRIPT [script args...]
#
# The node rank is Slurm's SLURM_NODEID; --no_ssh makes DeepSpeed's runner start only this
# node's ranks (the hostfile lists every node, in SLURM_NODEID order, so ranks line up).
# `$PYTHON -m deepspeed.launcher.runner` is the `deepspeed` command of that interpreter's environment.
set -euo pipefail
(( $# >= 4 )) || { echo "usage: launch_node.sh HOSTFILE MASTER_ADDR MASTER_PORT SCRIPT [args...]" >&2; exit 2; }
hostfile=$1 master_addr=$2 master_port=$3 script=$4
shift 4

# Slurm sends USR1 (the --signal lead time) and TERM (time limit, preemption) to every process of the
# step. DeepSpeed's runner would die of USR1 and orphan train.py; launch.py answers TERM by killing
# train.py 30 s later, whatever it is doing. So both ignore them (inherited through exec and fork);
# train.py installs its own handlers (PreemptionGuard), which replace the inherited "ignore", saves,
# requeues and exits, and the launchers exit with it.
trap '' USR1 TERM
exec "${PYTHON:-python3}" -m deepspeed.launcher.runner --hostfile "$hostfile" --no_ssh --node_rank "$SLURM_NODEID" \
    --master_addr "$master_addr" --master_port "$master_port" "$script" "$@"
