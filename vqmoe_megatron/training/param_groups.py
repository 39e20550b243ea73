"""AdamW parameter groups: which parameters decay, and how DeepSpeed tells expert ones apart."""

from __future__ import annotations

from torch import nn

from vqmoe_megatron.compat.deepspeed_moe import expert_group_name
from vqmoe_megatron.parallel_tensors import is_expert_param


def optimizer_param_groups(model: nn.Module, weight_decay: float, expert_parallel: int) -> list:
    """AdamW groups: no weight decay on 1-D parameters (norms, biases) and on codebooks.

    At EP > 1 expert parameters carry DeepSpeed's ``group_name``; the engine then splits them
    into their own optimizer groups, reduced over the expert-data-parallel group.
    """
    decay, no_decay = [], []
    group_name = expert_group_name(expert_parallel)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if expert_parallel > 1 and is_expert_param(name):
            param.allreduce = False
            param.group_name = group_name
        if param.dim() < 2 or name.endswith("quantizer.codebook"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
