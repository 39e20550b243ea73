"""Putting torch's ``LambdaLR`` at a given step on resume, which its public API cannot do.

torch 2.13 ``optim/lr_scheduler.py``: a scheduler reaches step N only by N calls of ``step()``
(``LRScheduler._update_lr``), or by ``load_state_dict`` of the state it saved, which is keyed to
the optimizer's parameter groups. Neither fits a resume here: the checkpoint stores only the step
count (``trainer_state.json``: layout-free), and the group count may differ from the saving run
(expert parallelism adds DeepSpeed 0.19.8's MoE parameter groups, ``split_params_into_different_
moe_groups_for_optimizer``). So :func:`restore_lambda_schedule` sets ``last_epoch``, each group's
``lr``, and the private ``_last_lr`` that ``get_last_lr()`` returns (set by nothing but
``_update_lr``).

Upstream issue: none filed at the time of writing. ``tests/test_compat.py`` fails when torch
changes the code this relies on (``get_last_lr`` / ``_update_lr``) or its result.
"""

from __future__ import annotations

from torch.optim.lr_scheduler import LambdaLR


def restore_lambda_schedule(scheduler: LambdaLR, param_groups: list[dict], steps: int) -> None:
    """Put ``scheduler`` at ``steps`` (as if ``step()`` had run ``steps`` times) and set the LR of
    ``param_groups`` (the optimizer's current groups, possibly more than the scheduler saw)."""
    scheduler.last_epoch = steps
    lrs = [base * fn(steps) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
