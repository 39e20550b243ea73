"""Worker: only rank 1 receives SIGUSR1; prints what StopRequest.agreed gives on each rank."""

import os
import signal

import torch
import torch.distributed as dist

from vqmoe_megatron.training.trainer import StopRequest


def main() -> None:
    dist.init_process_group("gloo")
    rank, cpu = dist.get_rank(), torch.device("cpu")
    stop = StopRequest()
    before = stop.agreed(cpu)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    dist.barrier()
    print(f"rank {rank}: received {stop.signal}, agreed {before} then {stop.agreed(cpu)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
