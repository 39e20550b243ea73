"""The DeepSpeed engine around a megatron-core model: the composition of the training parts.

:func:`initialize_engine` wires together, in this order: megatron's expert groups registered
with DeepSpeed (``compat.deepspeed_moe``, EP > 1), the sequence-parallel gradient hooks
(``training.sequence_parallel``), the AdamW parameter groups (``training.param_groups``), the
DeepSpeed JSON (``deepspeed_config``), the LR schedule (``training.lr_schedule``) and DeepSpeed's
``mpu`` view of megatron's process groups (``training.megatron_mpu``).
"""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from torch import nn

from vqmoe_megatron.compat.deepspeed_moe import DeepSpeedMoEMarker, register_expert_groups
from vqmoe_megatron.config import ConfigError, TrainConfig
from vqmoe_megatron.deepspeed_config import deepspeed_config
from vqmoe_megatron.model import VQMoEGPTModel
from vqmoe_megatron.training.lr_schedule import lr_lambda
from vqmoe_megatron.training.megatron_mpu import MegatronMPU
from vqmoe_megatron.training.param_groups import optimizer_param_groups
from vqmoe_megatron.training.sequence_parallel import register_sequence_parallel_grad_hooks


def initialize_engine(
    module: nn.Module,
    gpt: VQMoEGPTModel,
    train: TrainConfig,
    micro_batch_size: int,
    micro_batch_setting: str = "data.micro_batch_size",
) -> Any:
    """Wrap ``module`` (which holds ``gpt``, plus e.g. a task head) in a DeepSpeed engine with
    ZeRO, AdamW and the LR schedule; expert-parallel and sequence-parallel plumbing included.
    ``micro_batch_setting`` names the setting behind ``micro_batch_size`` (for errors)."""
    expert_parallel = gpt.config.expert_model_parallel_size
    if expert_parallel > 1:
        if train.zero_stage == 3:
            raise ConfigError(
                "train.zero_stage=3 cannot shard expert-parallel layers (DeepSpeed refuses ZeRO-3 "
                "with MoE); use zero_stage 1 or 2 with parallel.expert_parallel > 1"
            )
        register_expert_groups(expert_parallel)
        module.moe_marker = DeepSpeedMoEMarker(gpt.config.num_moe_experts, expert_parallel)
    register_sequence_parallel_grad_hooks(module)
    groups = optimizer_param_groups(module, train.weight_decay, expert_parallel)
    data_parallel = parallel_state.get_data_parallel_world_size()
    config = deepspeed_config(train, micro_batch_size, data_parallel, micro_batch_setting)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=groups,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(train)
        ),
        config=config,
        mpu=MegatronMPU(),
    )
    MoEAuxLossAutoScaler.set_loss_scale(
        torch.tensor(1.0 / engine.gradient_accumulation_steps(), device=engine.device)
    )
    return engine
