#!/usr/bin/env bash
# GPU check of the expert backends: on ONE GPU, bf16, the base and the large config, VQMoE on the
# grouped-GEMM experts and on Transformer Engine's grouped linear (when TE is installed), next to
# megatron top-2 as it ships; prints tokens/s and MFU per row (bench/pretrain_throughput.py on
# shards of the SOTU test fixture). Budget: under 8 minutes in all (each config has a timeout).
#
#   bash bench/gpu_check.sh             # on a GPU machine, from anywhere
#   bash bench/gpu_check.sh --dry-run   # any machine: check configs and row names, print commands
#
# Written on a CPU-only machine: the GPU run itself is unverified until recorded in
# bench/README.md. The large config runs at EP 1 (all 64 experts on the one GPU), vocabulary of
# the fixture tokenizer, no gradient accumulation.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python}
dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "error: unknown argument '$1' (use --dry-run or nothing)" >&2; exit 2 ;;
esac

if [[ $dry_run -eq 0 ]] && ! "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "error: no CUDA device visible to $python; run on a GPU machine or pass --dry-run" >&2
  exit 1
fi
te=$("$python" -c "from vqmoe_megatron.model import transformer_engine_available as t; print(int(t()))")

rows=(--only "megatron top-2" --only "vqmoe pretrain (top-1 + VQ, grouped)")
if [[ $te -eq 1 ]]; then
  rows+=(--only "vqmoe pretrain (top-1 + VQ, te)")
else
  echo "Transformer Engine not available: grouped backend only"
fi

one_gpu=(parallel.expert_parallel=1 parallel.tensor_parallel=1 model.vocab_size=null
         train.gradient_accumulation_steps=1 train.precision=bf16)

# config, steps, warm-up steps, timeout in seconds, extra overrides
run_config() {
  local config=$1 steps=$2 warmup=$3 limit=$4
  shift 4
  local cmd=("$python" bench/pretrain_throughput.py --config "$config" "${rows[@]}"
             --steps "$steps" --warmup "$warmup" "${one_gpu[@]}" "$@")
  echo "== $config"
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' timeout "$limit" "${cmd[@]}"
    echo
    "${cmd[@]}" --list
  else
    timeout "$limit" "${cmd[@]}"
  fi
}

run_config pretrain/configs/base.yaml 30 5 150
run_config pretrain/configs/large.yaml 10 3 300 data.micro_batch_size=4
