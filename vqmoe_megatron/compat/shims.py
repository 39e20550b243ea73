"""Process-wide patches that let megatron-core 0.16.1 and DeepSpeed 0.19.8 run on CPU with gloo.

Why patches at all: megatron allocates communication buffers with
``torch.empty(..., device=torch.cuda.current_device())`` inside autograd Functions of
``tensor_parallel.mappings`` and in DDP/dist-checkpointing helpers; no spec slot reaches them.
Each patch here asserts that CUDA is absent, and applying them twice is a no-op. They are applied
by :func:`vqmoe_megatron.compat.apply_process_patches` (called by ``init_distributed``, before
DeepSpeed's communication backend starts).

Patches (all CPU-only; torch 2.13, megatron-core 0.16.1, DeepSpeed 0.19.8):
1. ``torch.cuda.current_device()`` returns ``torch.device("cpu")`` so those buffers land on CPU.
2. ``torch.cuda.synchronize()`` is a no-op (dist_checkpointing calls it).
3. ``mappings._gather_along_first_dim`` gathers uneven splits by padding to the largest split,
   because ``ProcessGroupGloo::allgather`` refuses tensors of different sizes (hit by the
   all-to-all dispatcher when expert-TP > 1).
4. The class slot ``MoEAlltoAllTokenDispatcher.cuda_dtoh_stream`` holds a placeholder:
   ``MoEAlltoAllTokenDispatcher.__init__`` (``transformer/moe/token_dispatcher.py``) creates a
   ``torch.cuda.Stream()`` when the slot is empty, and ``MoELayer.__init__`` builds that stock
   dispatcher before ``PortableMoELayer`` can swap in ``moe.dispatcher``'s CPU-capable one (which
   never touches the stream off CUDA). Upstream: NVIDIA/Megatron-LM#6270 (open at the time of
   writing) skips the MoE stream construction on hosts without CUDA.
5. DeepSpeed's op table says ``deepspeed_shm_comm`` is incompatible: ``TorchBackend.__init__``
   (``comm/torch.py``, ``build_shm_op``) JIT-compiles that shared-memory op (~50 s of g++) when
   the probe finds a compiler, and only ``inference_all_reduce`` ever uses it. Upstream: no
   switch to skip it (deepspeedai/DeepSpeed#7625 asks for a way to bypass the SHM op).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist

_APPLIED = False
SHM_COMM_OP = "deepspeed_shm_comm"
"""DeepSpeed's name for the shared-memory communication op (``ShareMemCommBuilder.NAME``)."""


class NoCudaStream:
    """Placeholder for megatron's CUDA side stream in a process without CUDA (never used)."""


def _refuse_on_cuda(what: str) -> None:
    if torch.cuda.is_available():
        raise RuntimeError(
            f"refusing to apply the CPU shim '{what}': CUDA is available in this process. "
            "The CPU/gloo shims must never run on a GPU node."
        )


def _gather_uneven_first_dim(
    input_: torch.Tensor,
    group: dist.ProcessGroup,
    output_split_sizes: Optional[Sequence[int]] = None,
    use_global_buffer: bool = False,
) -> torch.Tensor:
    """All-gather along dim 0 with possibly uneven splits, using only equal-size collectives."""
    del use_global_buffer  # CPU: no global buffer needed
    assert group is not None, "group should not be None"
    world_size = group.size()
    if world_size == 1:
        return input_
    input_ = input_.contiguous()
    if output_split_sizes is None:
        output = input_.new_empty((input_.shape[0] * world_size, *input_.shape[1:]))
        dist.all_gather_into_tensor(output, input_, group=group)
        return output
    max_rows = max(output_split_sizes)
    padded = input_.new_zeros((max_rows, *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    gathered = input_.new_empty((max_rows * world_size, *input_.shape[1:]))
    dist.all_gather_into_tensor(gathered, padded, group=group)
    chunks = gathered.split(max_rows)
    return torch.cat([chunk[:rows] for chunk, rows in zip(chunks, output_split_sizes)], dim=0)


def apply_cpu_process_shims() -> None:
    """Apply every CPU shim once; raises if CUDA is available."""
    global _APPLIED
    if _APPLIED:
        return
    _refuse_on_cuda("cpu process shims")
    import deepspeed.ops
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    mappings._gather_along_first_dim = _gather_uneven_first_dim
    if MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None:
        MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = NoCudaStream()
    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    _APPLIED = True
