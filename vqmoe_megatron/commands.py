"""The commands, on top of everything else: pretraining and fine-tuning runners (called by
``pretrain/pretrain_vqmoe.py`` and ``finetune/glue.py``) and the console entry points
(setup.py).

Every command guards Ctrl-C from its first moment (``interrupt``) and only then imports its
work, which takes seconds (torch, megatron, DeepSpeed): so this module imports nothing heavy at
the top, and each runner imports what it needs when it is called. A user's mistake ends in one
``error: ...`` line and exit status 2 (``console.fail``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, Optional

from vqmoe_megatron.console import fail, quiet_third_party_warnings
from vqmoe_megatron.interrupt import guard_startup, run

if TYPE_CHECKING:
    from vqmoe_megatron.config import PretrainConfig
    from vqmoe_megatron.training.trainer import Trainer


def print_dry_run(cfg: PretrainConfig, world_size: Optional[int]) -> int:
    """Sizes, FLOPs per token and per-device memory of a config, without building tensors."""
    from vqmoe_megatron.config import ConfigError
    from vqmoe_megatron.config_checks import check_settings
    from vqmoe_megatron.training.flops import (
        experts_per_token,
        flops_per_token,
        memory_estimate_gib,
        model_size,
    )

    if cfg.model.vocab_size is None:
        return fail("model.vocab_size must be set for --dry-run (no data manifest is read)")
    par = cfg.parallel
    world = par.tensor_parallel * par.expert_parallel if world_size is None else world_size
    if world < 1:
        return fail(f"--world-size {world}: use a number of processes >= 1")
    try:
        check_settings(cfg, world)
    except ConfigError as exc:
        return fail(str(exc))
    size = model_size(cfg.model, cfg.moe)
    flops = flops_per_token(cfg.model, cfg.moe, cfg.model.seq_length)
    memory = memory_estimate_gib(
        cfg.model,
        cfg.moe,
        par,
        world_size=world,
        micro_batch_size=cfg.data.micro_batch_size,
        zero_stage=cfg.train.zero_stage,
        precision=cfg.train.precision,
        recompute=cfg.train.recompute_activations,
    )
    print(
        f"model: {cfg.model.num_layers} layers, d={cfg.model.hidden_size}, "
        f"{cfg.moe.num_experts} experts ({cfg.moe.router}, {cfg.moe.routing_mode}), "
        f"{experts_per_token(cfg.moe)} expert FFNs per token"
    )
    print(
        f"parameters: total {size.total:,} | active per token {size.active:,} | "
        f"experts {size.expert:,} | dense {size.dense:,} | embeddings {size.embedding:,}"
    )
    print(f"training FLOPs per token: {flops:.4e} (x{cfg.model.seq_length} tokens per sequence)")
    print(
        f"layout: world {world} = TP {par.tensor_parallel} x DP {world // par.tensor_parallel} "
        f"(EP {par.expert_parallel}), ZeRO-{cfg.train.zero_stage}, {cfg.train.precision}, "
        f"micro-batch {cfg.data.micro_batch_size}"
    )
    print(
        "estimated memory per device (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in memory.items())
    )
    return 0


def run_pretraining(
    config_path: str,
    overrides: Sequence[str],
    *,
    dry_run: bool = False,
    world_size: Optional[int] = None,
) -> int:
    """Load the config, then dry-run or train; returns the exit code."""
    quiet_third_party_warnings()
    from vqmoe_megatron.config import ConfigError, PretrainConfig, load_config

    try:
        cfg = load_config(PretrainConfig, config_path, overrides)
    except ConfigError as exc:
        return fail(str(exc))
    if dry_run:
        return print_dry_run(cfg, world_size)
    from vqmoe_megatron.training.lm_task import LanguageModelTask
    from vqmoe_megatron.training.trainer import Trainer

    return _train(lambda: Trainer(LanguageModelTask(cfg)))


def run_finetuning(config_path: Optional[str], overrides: Sequence[str]) -> int:
    """Resolve the fine-tuning config against the pretrained checkpoint, then fine-tune;
    returns the exit code."""
    quiet_third_party_warnings()
    from vqmoe_megatron.finetune.glue_task import GlueTask
    from vqmoe_megatron.finetune.pretrained import load_finetune_config
    from vqmoe_megatron.training.trainer import Trainer

    return _train(lambda: Trainer(GlueTask(load_finetune_config(config_path, overrides))))


def _train(build: Callable[[], Trainer]) -> int:
    """Build a trainer, run it, close it; a user's mistake ends in one ``error:`` line."""
    from vqmoe_megatron.checkpoint.errors import CheckpointError
    from vqmoe_megatron.config import ConfigError
    from vqmoe_megatron.data import DataError
    from vqmoe_megatron.distributed import destroy_distributed, launcher_rank
    from vqmoe_megatron.glue import GlueDataError
    from vqmoe_megatron.training.trainer import TrainingAborted

    trainer = None
    try:
        trainer = build()
        return trainer.run()
    except ConfigError as exc:  # every rank finds the same; one line is enough
        return fail(str(exc)) if launcher_rank() == 0 else 2
    except (DataError, GlueDataError, CheckpointError, TrainingAborted) as exc:
        return fail(str(exc))
    finally:
        if trainer is not None:
            trainer.close()
        else:
            destroy_distributed()


def convert() -> NoReturn:
    """``vqmoe-convert``: ``vqmoe_megatron.convert.__main__.main``."""
    guard_startup()
    from vqmoe_megatron.convert.__main__ import main

    run(main)


def evaluate() -> NoReturn:
    """``vqmoe-evaluate``: ``vqmoe_megatron.evaluate.main``."""
    guard_startup()
    from vqmoe_megatron.evaluate import main

    run(main)


def compare() -> NoReturn:
    """``vqmoe-compare``: ``vqmoe_megatron.compare.cli.main``."""
    guard_startup()
    from vqmoe_megatron.compare.cli import INTERRUPTED, main

    run(main, INTERRUPTED)
