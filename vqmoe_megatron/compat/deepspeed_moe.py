"""DeepSpeed 0.19.8's MoE handling driven by megatron-core's expert groups.

Two workarounds, both for ``deepspeed.moe`` / ``deepspeed.utils.groups`` of DeepSpeed 0.19.8,
which only knows expert groups it created itself (``groups._create_expert_and_data_parallel``,
named ``ep_size_<EP>``) and only switches its MoE handling on for its own ``MoE`` layer:

1. :func:`register_expert_groups` writes megatron's expert-model-parallel and
   expert-data-parallel groups into DeepSpeed's private tables (``_EXPERT_PARALLEL_GROUP``,
   ``_EXPERT_DATA_PARALLEL_GROUP`` and their ``*_RANKS``) under DeepSpeed's name for that EP size.
   The engine then reduces and partitions the parameters whose ``group_name`` is that name over
   megatron's expert-data-parallel group, the one megatron's all-to-all dispatcher assumes.
   DeepSpeed has no public call to register existing groups (``MoE._create_process_groups``
   builds new ones unless the name is already in the table, which is what this relies on).
2. :class:`DeepSpeedMoEMarker` is a ``deepspeed.moe.layer.MoE`` without weights:
   ``DeepSpeedEngine._configure_distributed_model`` enables the MoE optimizer groups only when
   ``isinstance(module, MoE)`` holds for some submodule, and then calls each one's
   ``set_deepspeed_parallelism()`` (here: nothing to create). Checkpoints never go through
   DeepSpeed's MoE checkpoint code (``checkpoint.training`` writes layout-free ones).

Upstream: no issue filed; the closest report is deepspeedai/Megatron-DeepSpeed#164 ("expert
parallel group is not initialized" when DeepSpeed's tables lack the name). Applied by
``training.engine.initialize_engine`` at EP > 1. ``tests/test_compat.py`` fails when DeepSpeed
renames the tables, stops reading them, or stops detecting MoE layers by ``isinstance``.
"""

from __future__ import annotations

import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups as ds_groups
from megatron.core import parallel_state
from torch import nn


def expert_group_name(expert_parallel: int) -> str:
    """DeepSpeed's naming for the expert groups of one EP size."""
    return f"ep_size_{expert_parallel}"


def register_expert_groups(expert_parallel: int) -> str:
    """Register megatron's expert and expert-data-parallel groups with DeepSpeed."""
    name = expert_group_name(expert_parallel)
    ep_group = parallel_state.get_expert_model_parallel_group()
    edp_group = parallel_state.get_expert_data_parallel_group()
    ds_groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ep_group)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(edp_group)
    return name


class DeepSpeedMoEMarker(MoE):
    """Weightless ``deepspeed.moe.layer.MoE`` that switches on the engine's MoE handling."""

    def __init__(self, num_experts: int, expert_parallel: int) -> None:
        nn.Module.__init__(self)  # deliberately skips MoE.__init__ (it would build experts)
        self.num_experts = num_experts
        self.ep_size = expert_parallel
        self.num_local_experts = num_experts // expert_parallel
        self.expert_group_name = expert_group_name(expert_parallel)
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Groups come from megatron (``register_expert_groups``); nothing to create."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("DeepSpeedMoEMarker is a marker and is never called")
