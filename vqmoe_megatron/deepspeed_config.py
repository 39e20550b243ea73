"""The DeepSpeed JSON config a run's settings produce (plus the user's ``train.deepspeed_config``).

Settings-level: it reads only the run config, so the config checks can build it before any
process group or model exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vqmoe_megatron.config import ConfigError, TrainConfig, merge


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
