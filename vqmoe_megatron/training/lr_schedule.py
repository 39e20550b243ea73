"""The learning-rate schedule: linear warmup, then cosine / linear / constant decay."""

from __future__ import annotations

import math
from collections.abc import Callable

from vqmoe_megatron.config import TrainConfig


def lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    """Multiplier of ``train.lr`` at optimizer step ``i``: linear warmup, then cosine/linear/
    constant decay to ``train.min_lr`` at ``train.steps``."""
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
