"""Per-parameter access to DeepSpeed 0.19.8's ZeRO-1/2 (and bf16) optimizer state.

The layout-free checkpoints (``checkpoint.training``) read each parameter's fp32 master value and
Adam moments and write them back at another layout; dead-code restarts of gradient-learned
codebooks (``training.codebook``) write rows of them. DeepSpeed's ``safe_get/set_full_*``
helpers do the per-parameter work (collectives over DP); what lives here depends on DeepSpeed's
private optimizer layout and on one of its bugs, which is why it sits in ``compat``:

* :func:`flat_optimizer_groups` reads the flat fp32 partitions of ``DeepSpeedZeroOptimizer``
  (``bit16_groups`` / ``single_partition_of_fp32_groups``) and ``BF16_Optimizer``
  (``bf16_groups`` / ``fp32_groups_flat_partition``), and :func:`optimizer_steps_taken` the
  wrapped torch optimizer's ``state``.
* :func:`link_optimizer_state_fragments` works around DeepSpeed 0.19.8 linking every
  parameter's optimizer-state fragment once, right after the FIRST parameter group's first
  optimizer step (``_link_all_hp_params`` / ``lazy_init_hp_params_optimizer_state`` in
  ``runtime/zero/stage_1_and_2.py``), when the later groups have no Adam state yet: their
  parameters then raise "exp_avg not found in optimizer state fragment" in
  ``safe_get_full_optimizer_state`` forever. Upstream issue: none filed at the time of writing.
  Re-linking with DeepSpeed's own helper fixes every group (idempotent); it is applied by
  :func:`optimizer_state_reader`, the one way this project reads moments.

``tests/test_compat.py`` fails when DeepSpeed renames those attributes or fixes the bug.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from deepspeed.utils import (
    lazy_init_hp_params_optimizer_state,
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
)
from torch import nn


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
