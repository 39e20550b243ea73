#!/usr/bin/env bash
#SBATCH --job-name=vqmoe-shard
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
#
# Tokenize a corpus on many nodes: an array job, then a merge job.
#   sbatch --array=0-15 slurm/shard_corpus.sh INPUTS --tokenizer M --output DIR --seq-length S [shard.py options]
# Array task I runs `data_tools/shard.py ARGS --part I --parts PARTS`: it tokenizes a contiguous
# run of the input files into DIR/.parts/ (see vqmoe_megatron/data/shard_parts.py). The array's
# first task, on its first run, submits the merge: this script again with MERGE=1, as a job that
# starts when every task of the array succeeded (--dependency=afterok, and is cancelled if one
# fails), running `shard.py ARGS --merge --parts PARTS`, which checks every part and writes the
# shards and DIR/manifest.json, byte-identical to a single-machine `shard.py ARGS` run.
#
# A preempted task is requeued by slurm (--requeue) and tokenizes its part again. After a failed
# task the merge job is cancelled; submit the same command again (or only the failed indices,
# e.g. `PARTS=16 sbatch --array=3,7 ...`): finished parts are verified (sha256) and skipped, and
# a new merge job is submitted. The merge by hand: `python data_tools/shard.py ARGS --merge --parts 16`.
#
# Knobs (environment; sbatch passes yours on):
#   PARTS     number of parts (default: the array size, for an array 0..N-1; required otherwise)
#   WORKERS   tokenizer processes per task (default: the task's CPUs); --workers in ARGS wins
#   PYTHON    interpreter with the project installed (default: python3 on PATH)
#   MERGE     1: run the merge (set by the merge job this script submits)
#   REPO_DIR  the repository (default: found from the job's command)
# DIR and the inputs must be on storage every node sees; relative paths are relative to the
# repository.
set -euo pipefail
# sbatch runs a copy of this file: find the repository from the job's command (an array job's
# record lists every task: take the first; no early `q`, which would SIGPIPE scontrol).
REPO_DIR="${REPO_DIR:-$(scontrol show job "${SLURM_JOB_ID:?submit this script with sbatch}" | sed -n 's|^ *Command=\(.*\)/slurm/[^/]*\.sh.*|\1|p' | sed -n 1p)}"
cd "${REPO_DIR:?cannot find the repository: set REPO_DIR}"
export REPO_DIR
PYTHON="${PYTHON:-python3}"
shard=("${PYTHON}" data_tools/shard.py --quiet --workers "${WORKERS:-${SLURM_CPUS_PER_TASK:-1}}" "$@")

if [[ "${MERGE:-0}" == 1 ]]; then
    echo "[vqmoe] $(date -Is) job ${SLURM_JOB_ID}: merging ${PARTS:?} parts"
    exec "${shard[@]}" --merge --parts "${PARTS}"
fi
if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    echo "shard_corpus.sh: submit it as an array job: sbatch --array=0-N slurm/shard_corpus.sh ..." >&2
    exit 2
fi
if [[ -z "${PARTS:-}" ]]; then
    if [[ "${SLURM_ARRAY_TASK_MIN}" != 0 || "${SLURM_ARRAY_TASK_COUNT}" != $((SLURM_ARRAY_TASK_MAX + 1)) ]]; then
        echo "shard_corpus.sh: --array is not 0..N-1: set PARTS to the number of parts" >&2
        exit 2
    fi
    PARTS="${SLURM_ARRAY_TASK_COUNT}"
fi

if [[ "${SLURM_ARRAY_TASK_ID}" == "${SLURM_ARRAY_TASK_MIN}" && "${SLURM_RESTART_COUNT:-0}" == 0 ]]; then
    log_dir="$(dirname "$(scontrol show job "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" | sed -n 's|^ *StdOut=\(.*\)$|\1|p' | sed -n 1p)")"
    merge_job="$(MERGE=1 PARTS="${PARTS}" sbatch --parsable --job-name=vqmoe-shard-merge \
        --cpus-per-task=1 --dependency="afterok:${SLURM_ARRAY_JOB_ID}" --kill-on-invalid-dep=yes \
        --output="${log_dir}/vqmoe-shard-merge-%j.out" "${REPO_DIR}/slurm/shard_corpus.sh" "$@")"
    echo "[vqmoe] merge job ${merge_job%%;*} starts when array job ${SLURM_ARRAY_JOB_ID} succeeded"
fi
echo "[vqmoe] $(date -Is) job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} run" \
    "$((${SLURM_RESTART_COUNT:-0} + 1)) on ${SLURMD_NODENAME:-$(hostname)}: part" \
    "${SLURM_ARRAY_TASK_ID} of ${PARTS}"
exec "${shard[@]}" --part "${SLURM_ARRAY_TASK_ID}" --parts "${PARTS}"
