# shellcheck shell=bash
# Sourced by the sbatch scripts in this folder: vqmoe_run launches one training program on every
# node of the allocation and requeues the job when the program was preempted.
#
# Launch: one srun task per node (slurm/node_launch.sh) execs torchrun or the DeepSpeed launcher
# (--no_ssh), which starts GPUS_PER_NODE processes there; node rank = SLURM_NODEID, MASTER_ADDR =
# the address (NodeAddr) of the allocation's first node.
#
# Signals, checkpoints, requeue (settled on a real 2-node slurm: tests/test_slurm_scripts.py)
# - The sbatch scripts ask for `--signal=USR1@<secs>`: <secs> before the time limit (up to 60 s
#   early, or one 30 s check interval late), slurm sends SIGUSR1 to every process of every job
#   step, not to this batch shell. `scancel --signal=USR1 <jobid>` does the same by hand. Slurm
#   sends it once: one that comes before the training processes are up is lost, so keep <secs>
#   well below the time limit minus the start-up time.
# - The step's processes are the per-node launcher and the training processes. Neither torchrun
#   nor the DeepSpeed launcher handles SIGUSR1, so by default it kills the launcher (status 138);
#   srun then terminates the step while the training processes are saving: with proctrack/cgroup
#   they are killed with it, with proctrack/linuxproc (the local test cluster) they are orphaned
#   outside slurm's control. So node_launch.sh runs `trap '' USR1` and execs the launcher, which
#   inherits SIGUSR1 as ignored; the training processes install their own handler (the program
#   contract), save in their own time, rank 0 writes $OUTPUT_DIR/preempted, all exit 0, and so
#   do the launchers.
# - The training processes' DataLoader workers are signalled too; they ignore SIGTERM and
#   SIGUSR1 (vqmoe_megatron/data/loader.py). Otherwise torch's worker handler dies on SIGTERM
#   and the training process fails mid-step ("DataLoader worker ... is killed by signal")
#   instead of saving. tests/test_slurm_pretrain.py runs the real program through both paths.
# - Not `--signal=B:USR1`: that reaches only this batch shell, which would then have to pass the
#   signal on to every node (scancel --signal), i.e. to where slurm delivers it anyway.
# - SIGTERM (scancel, the time limit itself, `scontrol requeue`, preemption by slurm) also
#   reaches every process: the training processes save on it, but only within KillWait
#   (slurm.conf, often 30 s) and the launchers' 30 s shutdown grace; the batch shell is killed
#   too. After scancel or the time limit the job ends (CANCELLED, TIMEOUT) and resubmitting
#   resumes; after `scontrol requeue` or preemption in REQUEUE mode slurm requeues it itself.
#   USR1 with a generous lead time is the intended path.
# - After the step ends: a stale `preempted` was removed before the launch, so if the file now
#   exists this run was preempted and saved: `scontrol requeue` puts the job back in the queue
#   (same job id, SLURM_RESTART_COUNT counts the restarts, the log is appended to; slurm holds a
#   requeued job for AuthInfo cred_expire, 120 s by default), and the program resumes from
#   $OUTPUT_DIR/checkpoints. Otherwise the job ends with the launch's exit status.
# - Requirements: OUTPUT_DIR on storage every node sees; ProctrackType cgroup or linuxproc (both
#   find the workers, which torchrun starts in their own sessions; proctrack/pgid would not).
#
# Environment knobs (sbatch exports the submitting shell's environment):
#   EXTRA          more arguments for the program, split on whitespace, after the script's
#                  own and its command-line arguments (e.g. "train.steps=20 parallel.expert_parallel=2")
#   LAUNCHER       torchrun (default) or deepspeed
#   PYTHON         interpreter with the project installed (default: python3 on PATH)
#   GPUS_PER_NODE  processes per node (default: the GPUs slurm allocated on the node, else 1,
#                  so the same scripts run on CPU-only nodes)
#   MASTER_PORT    rendezvous port on the first node (default: 20000 + job id % 20000)
#   OMP_NUM_THREADS  default: cpus-per-task / GPUS_PER_NODE
# NCCL defaults (exported unless already set; ignored by gloo on CPU):
#   NCCL_DEBUG=WARN
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  a failed collective aborts the process (so the job ends)
#                                      instead of hanging until the time limit
#   CUDA_DEVICE_MAX_CONNECTIONS=1      required by megatron-core's tensor/sequence-parallel
#                                      communication overlap
#   Not set here, cluster-specific: NCCL_SOCKET_IFNAME (bootstrap interface, e.g. ib0 or
#   ^lo,docker), NCCL_IB_HCA (InfiniBand adapters), NCCL_IB_GID_INDEX (RoCE).

# vqmoe_run OUTPUT_DIR PROGRAM [ARG ...]: run `PROGRAM ARG ... EXTRA` on every node, from the
# repository root (relative paths are relative to it); requeue the job if it was preempted
# (OUTPUT_DIR/preempted written), else exit with the launch's status.
vqmoe_run() {
    local output_dir="$1"
    shift
    local extra
    read -ra extra <<<"${EXTRA:-}"
    cd "${REPO_DIR}" || exit
    export LAUNCHER="${LAUNCHER:-torchrun}"
    export PYTHON="${PYTHON:-python3}"
    export GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
    export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    local cpus="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((cpus / GPUS_PER_NODE > 0 ? cpus / GPUS_PER_NODE : 1))}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

    local hosts first_host
    mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST}")
    first_host="${hosts[0]}"
    # The node's address as slurm knows it (a node name need not resolve, as on the local test
    # cluster, where every node is 127.0.0.1); fall back to the name.
    MASTER_ADDR="$(scontrol show node "${first_host}" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')"
    export MASTER_ADDR="${MASTER_ADDR:-${first_host}}"

    mkdir -p "${output_dir}"
    rm -f "${output_dir}/preempted"
    if [[ "${LAUNCHER}" == deepspeed ]]; then
        export HOSTFILE="${output_dir}/hostfile"
        local host
        for host in "${hosts[@]}"; do echo "${host} slots=${GPUS_PER_NODE}"; done >"${HOSTFILE}"
    fi

    local launch=(srun --nodes="${SLURM_JOB_NUM_NODES}" --ntasks="${SLURM_JOB_NUM_NODES}"
        --ntasks-per-node=1 --kill-on-bad-exit=1 --label)
    # slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: pass it, or every rank
    # of the node would share one core.
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        launch+=(--cpus-per-task="${SLURM_CPUS_PER_TASK}")
    fi
    launch+=("${REPO_DIR}/slurm/node_launch.sh" "$@" "${extra[@]}")

    local commit
    commit="$(git -C "${REPO_DIR}" rev-parse HEAD 2>/dev/null || echo unknown)"
    if [[ -n "$(git -C "${REPO_DIR}" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
        commit+=" (with uncommitted changes)"
    fi
    echo "[vqmoe] $(date -Is) job ${SLURM_JOB_ID} run $((${SLURM_RESTART_COUNT:-0} + 1)) on ${SLURM_JOB_NODELIST}:" \
        "${SLURM_JOB_NUM_NODES} nodes x ${GPUS_PER_NODE} processes, ${LAUNCHER}," \
        "master ${MASTER_ADDR}:${MASTER_PORT}"
    echo "[vqmoe] repository ${REPO_DIR} at ${commit}"
    echo "[vqmoe] command: $(printf '%q ' "${launch[@]}")"

    local status=0
    "${launch[@]}" || status=$?
    echo "[vqmoe] $(date -Is) launch ended with status ${status}"
    if [[ -e "${output_dir}/preempted" ]]; then
        echo "[vqmoe] ${output_dir}/preempted exists: requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "${SLURM_JOB_ID}"
        exit 0
    fi
    exit "${status}"
}
