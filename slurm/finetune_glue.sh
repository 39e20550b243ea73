#!/usr/bin/env bash
#SBATCH --job-name=vqmoe-glue
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=08:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@180
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# GLUE fine-tuning of a pretrained VQMoE checkpoint (router dropped, discrete routing):
#   TASK=mrpc PRETRAINED=runs/vqmoe-large/checkpoints sbatch slurm/finetune_glue.sh [OVERRIDE ...]
# One launcher on the node starts GPUS_PER_NODE ranks; 3 min before the time limit every rank
# gets SIGUSR1, saves, and the job requeues itself. Design and the shared knobs (LAUNCHER, PYTHON,
# GPUS_PER_NODE, MASTER_PORT, EXTRA, NCCL_*): slurm/common.sh. Knobs of this script:
#   TASK              sst2 (any GLUE task name: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli)
#   DATA_DIR          data/glue (the GLUE folder that holds one folder per task: SST-2/, MNLI/, ...)
#   PRETRAINED        runs/vqmoe-large/checkpoints
#   OUTPUT_DIR        runs/glue/$TASK
#   DEEPSPEED_CONFIG  (unset: the program's default) a DeepSpeed JSON config
#   PROGRAM           finetune/glue.py
set -euo pipefail
# sbatch runs a copy of this file: find the repository from the job's command (or set REPO_DIR).
REPO_DIR="${REPO_DIR:-$(scontrol show job "${SLURM_JOB_ID:?submit this script with sbatch}" | sed -n 's|^ *Command=\(.*\)/slurm/[^/]*\.sh.*|\1|p')}"
# shellcheck source=slurm/common.sh
source "${REPO_DIR:?cannot find the repository: set REPO_DIR}/slurm/common.sh"

TASK="${TASK:-sst2}"
OUTPUT_DIR="${OUTPUT_DIR:-runs/glue/${TASK}}"
args=(--task "${TASK}" --data_dir "${DATA_DIR:-data/glue}"
    --pretrained "${PRETRAINED:-runs/vqmoe-large/checkpoints}" --output_dir "${OUTPUT_DIR}")
if [[ -n "${DEEPSPEED_CONFIG:-}" ]]; then
    args+=(--deepspeed_config "${DEEPSPEED_CONFIG}")
fi
vqmoe_run "${OUTPUT_DIR}" "${PROGRAM:-finetune/glue.py}" "${args[@]}" "$@"
