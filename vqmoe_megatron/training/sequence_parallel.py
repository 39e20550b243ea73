"""Gradient hooks that sum sequence-parallel parameters' gradients over tensor parallelism.

Under sequence parallelism each TP rank sees a slice of the sequence, so replicated parameters
(norms, routers, gates, codebooks) get partial gradients; megatron's ``finalize_model_grads``
sums them in megatron's own loop. Under DeepSpeed the sum happens in a tensor hook instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from vqmoe_megatron.distributed import sequence_parallel_params


def register_sequence_parallel_grad_hooks(model: nn.Module) -> list:
    """Sum over TP the gradients of sequence-parallel parameters as they are produced.

    Under ZeRO-2 gradients are reduced inside backward hooks, so the TP sum must happen in the
    tensor hook, before DeepSpeed sees the gradient. No-op (no hooks) at TP = 1.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    if group.size() == 1:
        return []

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    return [p.register_hook(hook) for p in sequence_parallel_params(model) if p.requires_grad]
