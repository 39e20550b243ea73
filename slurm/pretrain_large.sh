#!/usr/bin/env bash
#SBATCH --job-name=vqmoe-large
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Multi-node VQMoE pretraining: `sbatch slurm/pretrain_large.sh [OVERRIDE ...]`, e.g.
#   sbatch --nodes=8 slurm/pretrain_large.sh train.steps=200000
#   CONFIG=pretrain/configs/other.yaml LAUNCHER=deepspeed sbatch slurm/pretrain_large.sh
# --ntasks-per-node=1: one launcher per node, which starts GPUS_PER_NODE ranks.
# Preemption: 10 min before the time limit slurm sends SIGUSR1 to every training process (the
# launchers ignore it), each rank saves, rank 0 writes OUTPUT_DIR/preempted, and the job requeues
# itself and resumes from the checkpoint. Design and the shared knobs (LAUNCHER, PYTHON,
# GPUS_PER_NODE, MASTER_PORT, EXTRA, NCCL_*): slurm/common.sh. Knobs of this script:
#   CONFIG      pretrain/configs/large.yaml
#   DATA_DIR    data/shards
#   OUTPUT_DIR  runs/vqmoe-large (a new job with the same OUTPUT_DIR resumes the run)
#   PROGRAM     pretrain/pretrain_vqmoe.py
set -euo pipefail
# sbatch runs a copy of this file: find the repository from the job's command (or set REPO_DIR).
REPO_DIR="${REPO_DIR:-$(scontrol show job "${SLURM_JOB_ID:?submit this script with sbatch}" | sed -n 's|^ *Command=\(.*\)/slurm/[^/]*\.sh.*|\1|p')}"
# shellcheck source=slurm/common.sh
source "${REPO_DIR:?cannot find the repository: set REPO_DIR}/slurm/common.sh"

CONFIG="${CONFIG:-pretrain/configs/large.yaml}"
DATA_DIR="${DATA_DIR:-data/shards}"
OUTPUT_DIR="${OUTPUT_DIR:-runs/vqmoe-large}"
vqmoe_run "${OUTPUT_DIR}" "${PROGRAM:-pretrain/pretrain_vqmoe.py}" --config "${CONFIG}" \
    "train.output_dir=${OUTPUT_DIR}" "data.data_dir=${DATA_DIR}" "$@"
