#!/usr/bin/env bash
#SBATCH --job-name=vqmoe-small
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# One-node VQMoE pretraining: `sbatch slurm/pretrain_small.sh [OVERRIDE ...]`, e.g.
#   sbatch --gpus-per-node=4 slurm/pretrain_small.sh train.steps=20000
# It runs slurm/pretrain_large.sh (same knobs and launch) in this one-node allocation, with
#   CONFIG      pretrain/configs/base.yaml
#   OUTPUT_DIR  runs/vqmoe-small
# 5 min before the time limit every rank gets SIGUSR1, saves, and the job requeues itself.
set -euo pipefail
export CONFIG="${CONFIG:-pretrain/configs/base.yaml}" OUTPUT_DIR="${OUTPUT_DIR:-runs/vqmoe-small}"
# sbatch runs a copy of this file: find the repository from the job's command (or set REPO_DIR).
REPO_DIR="${REPO_DIR:-$(scontrol show job "${SLURM_JOB_ID:?submit this script with sbatch}" | sed -n 's|^ *Command=\(.*\)/slurm/[^/]*\.sh.*|\1|p')}"
# pretrain_large.sh with the defaults above; its #SBATCH lines are plain comments when run here.
export REPO_DIR
exec bash "${REPO_DIR:?cannot find the repository: set REPO_DIR}/slurm/pretrain_large.sh" "$@"
