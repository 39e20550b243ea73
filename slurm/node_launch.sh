#!/usr/bin/env bash
# One srun task per node runs this: it execs the per-node launcher (torchrun or the DeepSpeed
# launcher without ssh), which starts GPUS_PER_NODE training processes on this node.
#   usage (from slurm/common.sh): srun --ntasks-per-node=1 slurm/node_launch.sh PROGRAM [ARG ...]
# Reads LAUNCHER, PYTHON, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT (and HOSTFILE for deepspeed)
# from the environment the batch script exported, and SLURM_NNODES/SLURM_NODEID from srun.
#
# `trap '' USR1`: the launcher inherits SIGUSR1 as ignored (exec keeps an ignored disposition,
# and neither launcher installs a SIGUSR1 handler), so slurm's checkpoint signal, which reaches
# every process of the step, no longer kills the launcher; the training processes install their
# own handler and save. See the design notes at the top of slurm/common.sh.
set -euo pipefail
trap '' USR1

case "${LAUNCHER}" in
torchrun)
    cmd=("${PYTHON}" -m torch.distributed.run
        --nnodes "${SLURM_NNODES}" --nproc_per_node "${GPUS_PER_NODE}"
        --node_rank "${SLURM_NODEID}" --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}"
        --max_restarts 0)
    ;;
deepspeed)
    # --no_local_rank: the programs read LOCAL_RANK from the environment, not a --local_rank flag.
    cmd=("${PYTHON}" -m deepspeed.launcher.runner --hostfile "${HOSTFILE}" --no_ssh
        --node_rank "${SLURM_NODEID}" --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}"
        --no_local_rank)
    ;;
*)
    echo "node_launch.sh: LAUNCHER must be torchrun or deepspeed, not '${LAUNCHER}'" >&2
    exit 2
    ;;
esac
cmd+=("$@")
echo "[vqmoe] node ${SLURM_NODEID} (${SLURMD_NODENAME:-$(hostname)}): $(printf '%q ' "${cmd[@]}")"
exec "${cmd[@]}"
