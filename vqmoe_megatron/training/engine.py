"""DeepSpeed engine around a megatron-core model: process groups, expert groups, ZeRO config.

Three adapters connect megatron-core's parallel state to DeepSpeed 0.19:

* :class:`MegatronMPU` answers DeepSpeed's ``mpu`` questions from ``parallel_state`` (megatron
  0.16 dropped the legacy names DeepSpeed still calls), so ZeRO shards dense parameters over
  megatron's data-parallel group and computes gradient norms across TP correctly.
* Expert parameters (megatron marks them ``allreduce=False`` at EP > 1) get a DeepSpeed
  ``group_name`` and megatron's expert / expert-data-parallel groups are registered under that
  name, so ZeRO reduces and partitions them over the expert-data-parallel group only.
* :class:`DeepSpeedMoEMarker` is an instance of ``deepspeed.moe.layer.MoE`` with no weights: the
  engine enables its MoE handling (separate expert optimizer groups) only when it finds one.
  It owns no parameters; checkpoints do not go through DeepSpeed's MoE checkpoint code
  (``training.checkpoint`` writes layout-free ones).

Sequence-parallel parameters (norms, routers, gates, codebooks) get a gradient hook that sums
their gradient over TP, the step megatron's ``finalize_model_grads`` performs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups as ds_groups
from deepspeed.utils import (
    lazy_init_hp_params_optimizer_state,
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from torch import nn

from vqmoe_megatron.config import ConfigError, TrainConfig, merge
from vqmoe_megatron.distributed import sequence_parallel_params
from vqmoe_megatron.model import VQMoEGPTModel
from vqmoe_megatron.parallel_tensors import is_expert_param


class MegatronMPU:
    """DeepSpeed's ``mpu`` interface on top of megatron-core's ``parallel_state`` (PP = 1)."""

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_data_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(parallel_state.get_data_parallel_group())

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


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


class LanguageModel(nn.Module):
    """The module DeepSpeed wraps: next-token loss of a megatron GPT on packed token windows."""

    def __init__(self, gpt: VQMoEGPTModel, pad_id: int) -> None:
        super().__init__()
        self.gpt = gpt
        self.pad_id = pad_id

    def forward(
        self, tokens: torch.Tensor, loss_mask: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``tokens`` [B, S+1] -> (mean loss over real targets, NLL sum, number of targets).

        Targets equal to the pad id are not counted; ``loss_mask`` [B, S] (1 = count) instead
        selects the targets explicitly (evaluation windows that score only their tail).
        """
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        per_token = self.gpt(inputs, None, None, labels=labels)
        mask = labels != self.pad_id if loss_mask is None else loss_mask.bool()
        mask = mask.to(per_token.dtype)
        nll_sum = (per_token.float() * mask).sum()
        count = mask.sum()
        return nll_sum / count.clamp(min=1), nll_sum.detach(), count.detach()


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


def deepspeed_config(
    train: TrainConfig,
    micro_batch_size: int,
    data_parallel: int,
    micro_batch_setting: str = "data.micro_batch_size",
) -> dict[str, Any]:
    """DeepSpeed JSON config from the run config; ``train.deepspeed_config`` entries win,
    except the batch: the training loops and the token counts follow the run config's micro
    batch (named ``micro_batch_setting`` in errors) and accumulation steps, so a JSON that
    changes them is refused.

    On CPU the optimizer is torch's AdamW (``torch_adam``) so nothing is JIT-compiled.
    """
    on_cpu = not torch.cuda.is_available()
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {
            "stage": train.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": not on_cpu,
            "reduce_scatter": True,
        },
        "bf16": {"enabled": train.precision == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": [train.adam_beta1, train.adam_beta2],
                "eps": train.adam_eps,
                "weight_decay": train.weight_decay,
                "torch_adam": on_cpu,
            },
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if train.deepspeed_config:
        path = Path(train.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed_config: {path} does not exist")
        try:
            user = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON ({exc})") from exc
        config = merge(config, user)
        batch = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": train.gradient_accumulation_steps,
            "train_batch_size": micro_batch_size
            * train.gradient_accumulation_steps
            * data_parallel,
        }
        wrong = [
            f"{key}={config[key]}"
            for key, value in batch.items()
            if config.get(key, value) != value
        ]
        if wrong:
            raise ConfigError(
                f"{path} sets {', '.join(wrong)}; set the batch with {micro_batch_setting} and "
                "train.gradient_accumulation_steps instead"
            )
    return config


def lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    """Multiplier of ``train.lr`` at optimizer step ``i``: linear warmup, then cosine/linear/
    constant decay to ``train.min_lr`` at ``train.steps``."""
    import math

    floor = train.min_lr / train.lr if train.lr > 0 else 0.0

    def factor(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.lr_schedule == "constant":
            return 1.0
        span = max(train.steps - train.warmup_steps, 1)
        progress = min(max(step - train.warmup_steps, 0) / span, 1.0)
        if train.lr_schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * decay

    return factor


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


def full_fp32_param(param: nn.Parameter) -> torch.Tensor:
    """The full fp32 master value of a (local TP/EP shard of a) parameter (collective over DP)."""
    value = safe_get_full_fp32_param(param)
    return param.detach().float() if value is None else value


def flat_optimizer_groups(engine: Any) -> list[tuple[list[nn.Parameter], torch.Tensor]]:
    """(low-precision params, flat fp32 partition) per optimizer group of ZeRO-1/2 / bf16."""
    zero = engine.optimizer
    if hasattr(zero, "single_partition_of_fp32_groups"):
        return list(zip(zero.bit16_groups, zero.single_partition_of_fp32_groups))
    if hasattr(zero, "fp32_groups_flat_partition"):
        return list(zip(zero.bf16_groups, zero.fp32_groups_flat_partition))
    raise ValueError(
        f"{type(zero).__name__} is not a ZeRO stage 1/2 or bf16 optimizer; use train.zero_stage 1 or 2"
    )


def optimizer_steps_taken(engine: Any) -> int:
    """Adam's step counter (0 before the first applied optimizer step)."""
    base = engine.optimizer.optimizer
    for state in base.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def link_optimizer_state_fragments(engine: Any) -> None:
    """Point every parameter's fragment mapping at the current Adam state.

    DeepSpeed 0.19.8 links the fragments once, right after the FIRST parameter group's first
    optimizer step, when the later groups have no state yet; their parameters then raise
    "exp_avg not found in optimizer state fragment" in ``safe_get_full_optimizer_state``
    forever. Re-linking with DeepSpeed's own helper fixes every group (idempotent).
    """
    state = engine.optimizer.optimizer.state
    for lp_group, flat in flat_optimizer_groups(engine):
        if state.get(flat):
            lazy_init_hp_params_optimizer_state(lp_group, flat, state)


def optimizer_state_reader(
    engine: Any,
) -> Optional[Callable[[nn.Parameter, str], torch.Tensor]]:
    """``read(param, key)`` -> a parameter's full Adam moment ``key`` (collective over DP), or
    None before the first optimizer step. Links the fragments once for all the reads after."""
    if optimizer_steps_taken(engine) == 0:
        return None
    link_optimizer_state_fragments(engine)
    return safe_get_full_optimizer_state


def write_codebook_rows(engine: Any) -> Callable[[nn.Parameter, torch.Tensor, torch.Tensor], None]:
    """Row writer for dead-code restarts under DeepSpeed: updates the module parameter, ZeRO's
    fp32 master copy, and zeroes the Adam moments of the restarted rows (every DP rank calls it
    with identical arguments)."""

    def write(param: nn.Parameter, rows: torch.Tensor, values: torch.Tensor) -> None:
        master = full_fp32_param(param).clone()
        master[rows.to(master.device)] = values.to(master)
        safe_set_full_fp32_param(param, master)
        with torch.no_grad():
            param.copy_(master.to(param))
        read_state = optimizer_state_reader(engine)
        if read_state is None:
            return
        for key in ("exp_avg", "exp_avg_sq"):
            state = read_state(param, key).clone()
            state[rows.to(state.device)] = 0
            safe_set_full_optimizer_state(param, state, key)

    return write
