"""Process groups: launcher discovery, DeepSpeed's communication init, megatron parallel state.

Works under every launcher the project supports, with the same code:
- a plain ``python script.py`` (one process; a free local port is picked),
- ``torchrun`` and the ``deepspeed`` launcher (RANK/WORLD_SIZE/... already set),
- ``mpirun`` (DeepSpeed's mpi4py discovery fills the variables),
- ``srun`` with one task per GPU (SLURM_* mapped to the torch variables when RANK is unset).
The backend is never hard-coded: DeepSpeed picks NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

_TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_MPI_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes and ranks of this process in the megatron layout (pipeline parallel is 1)."""

    world_size: int
    rank: int
    local_rank: int
    tensor_parallel: int
    expert_parallel: int
    data_parallel: int
    expert_data_parallel: int

    def describe(self) -> str:
        """One line for the logs."""
        return (
            f"world {self.world_size} = TP {self.tensor_parallel} x DP {self.data_parallel} "
            f"(EP {self.expert_parallel} x expert-DP {self.expert_data_parallel})"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """First host of a slurm node list (``scontrol show hostnames``), e.g. node[1-4] -> node1."""
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
    )
    return out.stdout.split()[0]


def map_launcher_environment(env: Optional[dict] = None) -> str:
    """Fill the torch.distributed variables from the launcher; returns the launcher's name.

    Leaves everything alone when RANK is already set (torchrun, deepspeed) or an MPI launcher
    is detected (DeepSpeed's mpi4py discovery handles it).
    """
    env = os.environ if env is None else env
    if "RANK" in env:
        return "torch"
    if any(var in env for var in _MPI_VARS):
        return "mpi"
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _first_slurm_host(env["SLURM_JOB_NODELIST"]))
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return "slurm"
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    return "single"


def launcher_world_size(env: Optional[dict] = None) -> int:
    """The number of processes the launcher started (1 for a plain ``python``), read from the
    environment before any process group exists (same launchers as
    :func:`map_launcher_environment`)."""
    env = os.environ if env is None else env
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        if var in env:
            return int(env[var])
    if "SLURM_PROCID" in env:
        return int(env.get("SLURM_NTASKS", "1"))
    return 1


def launcher_rank(env: Optional[dict] = None) -> int:
    """This process's global rank as the launcher set it (0 for a plain ``python``)."""
    env = os.environ if env is None else env
    for var in ("RANK", *_MPI_VARS, "SLURM_PROCID"):
        if var in env:
            return int(env[var])
    return 0


def init_distributed(
    tensor_parallel: int = 1, expert_parallel: int = 1, seed: int = 1234
) -> ParallelLayout:
    """Initialise torch.distributed (through DeepSpeed) and megatron's parallel state.

    Idempotent for the process group; megatron's parallel state is (re)built with the requested
    sizes. The process-wide patches of :mod:`vqmoe_megatron.compat` are applied first.
    """
    import deepspeed
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from vqmoe_megatron.compat import apply_process_patches

    map_launcher_environment()
    apply_process_patches()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=True, verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    world = dist.get_world_size()
    if world % (tensor_parallel * expert_parallel) != 0:
        from vqmoe_megatron.config import ConfigError

        raise ConfigError(
            f"world size {world} is not divisible by tensor_parallel ({tensor_parallel}) x "
            f"expert_parallel ({expert_parallel}); set parallel.* so that it is"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=expert_parallel,
    )
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not torch.cuda.is_available())
    return ParallelLayout(
        world_size=world,
        rank=dist.get_rank(),
        local_rank=local_rank,
        tensor_parallel=tensor_parallel,
        expert_parallel=expert_parallel,
        data_parallel=parallel_state.get_data_parallel_world_size(),
        expert_data_parallel=parallel_state.get_expert_data_parallel_world_size(),
    )


def destroy_distributed() -> None:
    """Tear down megatron's state and the process group (gloo can abort at exit otherwise)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def sequence_parallel_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Replicated parameters whose gradients are partial under sequence parallelism."""
    return [p for p in model.parameters() if getattr(p, "sequence_parallel", False)]


def allreduce_sequence_parallel_grads(model: torch.nn.Module) -> None:
    """Sum over the TP group the gradients of sequence-parallel parameters (norms, routers,
    gates, codebooks): each TP rank saw a slice of the sequence. megatron's own
    ``finalize_model_grads`` does this step in megatron's training loop."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    if group.size() == 1:
        return
    grads = [p.grad for p in sequence_parallel_params(model) if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)
