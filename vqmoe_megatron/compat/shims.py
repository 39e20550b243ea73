"""Process-wide patches that let megatron-core run on CPU with gloo.

Why patches at all: megatron allocates communication buffers with
``torch.empty(..., device=torch.cuda.current_device())`` inside autograd Functions of
``tensor_parallel.mappings`` and in DDP/dist-checkpointing helpers; no spec slot reaches them.
Each patch here asserts that CUDA is absent, and applying them twice is a no-op.

Patches (all CPU-only):
1. ``torch.cuda.current_device()`` returns ``torch.device("cpu")`` so those buffers land on CPU.
2. ``torch.cuda.synchronize()`` is a no-op (dist_checkpointing calls it).
3. ``mappings._gather_along_first_dim`` gathers uneven splits by padding to the largest split,
   because ``ProcessGroupGloo::allgather`` refuses tensors of different sizes (hit by the
   all-to-all dispatcher when expert-TP > 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist

_APPLIED = False


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
    from megatron.core.tensor_parallel import mappings

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    mappings._gather_along_first_dim = _gather_uneven_first_dim
    _APPLIED = True
