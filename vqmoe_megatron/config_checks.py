"""Checks of a run config's values, alone and against the world size, before anything is built.

``config.py`` checks names and types; this module checks what the types allow but a run cannot
use: values out of range (``train.lr=-1``) and combinations that megatron or DeepSpeed would
only refuse once the process groups and the model exist (experts not divisible by the expert
parallel size, heads or FFN widths by the tensor parallel size, ...), where every rank would
print a traceback. ``check_settings`` runs in ``--dry-run`` and at the start of pretraining and
fine-tuning; each failure is one ConfigError naming the setting and a value that works.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

from vqmoe_megatron.config import ConfigError, FinetuneConfig, PretrainConfig
from vqmoe_megatron.paths import file_in_the_way

RunConfig = Union[PretrainConfig, FinetuneConfig]


@dataclass(frozen=True)
class Range:
    """Numbers from ``low`` to ``high`` (either end open or absent)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return (
            f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
            f"{')' if self.high_open else ']'}"
        )


POSITIVE = Range(1)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)
BELOW_ONE = Range(0, 1, high_open=True)

RANGES: dict[str, Range] = {
    "model.num_layers": POSITIVE,
    "model.hidden_size": POSITIVE,
    "model.num_attention_heads": POSITIVE,
    "model.num_query_groups": POSITIVE,
    "model.ffn_hidden_size": POSITIVE,
    "model.vocab_size": Range(5),
    "model.seq_length": POSITIVE,
    "model.rotary_base": POSITIVE,
    "model.hidden_dropout": BELOW_ONE,
    "model.attention_dropout": BELOW_ONE,
    "model.init_method_std": Range(0, low_open=True),
    "moe.num_experts": NON_NEGATIVE,
    "moe.expert_ffn_hidden_size": POSITIVE,
    "moe.layer_freq": POSITIVE,
    "moe.topk": POSITIVE,
    "moe.capacity_factor": Range(0, low_open=True),
    "moe.aux_loss_coeff": NON_NEGATIVE,
    "moe.z_loss_coeff": NON_NEGATIVE,
    "moe.num_codes": POSITIVE,
    "moe.contrib_rate": FRACTION,
    "moe.vq_loss_coeff": NON_NEGATIVE,
    "moe.commitment_cost": NON_NEGATIVE,
    "moe.codebook_init_std": Range(0, low_open=True),
    "moe.kmeans_iters": POSITIVE,
    "moe.ema_decay": Range(0, 1, low_open=True, high_open=True),
    "moe.dead_code_interval": NON_NEGATIVE,
    "moe.dead_code_threshold": NON_NEGATIVE,
    "moe.xmoe_dim": POSITIVE,
    "moe.xmoe_temperature": Range(0, low_open=True),
    "moe.smoe_dropout_k_min": POSITIVE,
    "moe.smoe_dropout_k_max": POSITIVE,
    "moe.smoe_dropout_ramp_steps": NON_NEGATIVE,
    "moe.smoe_dropout_eval_k": POSITIVE,
    "moe.stablemoe_stage1_steps": NON_NEGATIVE,
    "moe.stablemoe_distill_dim": POSITIVE,
    "moe.stablemoe_balance_coeff": NON_NEGATIVE,
    "moe.stablemoe_distill_coeff": NON_NEGATIVE,
    "parallel.tensor_parallel": POSITIVE,
    "parallel.expert_parallel": POSITIVE,
    "data.micro_batch_size": POSITIVE,
    "data.num_workers": NON_NEGATIVE,
    "train.steps": POSITIVE,
    "train.lr": Range(0, low_open=True),
    "train.min_lr": NON_NEGATIVE,
    "train.warmup_steps": NON_NEGATIVE,
    "train.weight_decay": NON_NEGATIVE,
    "train.adam_beta1": BELOW_ONE,
    "train.adam_beta2": BELOW_ONE,
    "train.adam_eps": Range(0, low_open=True),
    "train.grad_clip": NON_NEGATIVE,
    "train.gradient_accumulation_steps": POSITIVE,
    "train.zero_stage": Range(1, 2),
    "train.log_interval": POSITIVE,
    "train.eval_interval": NON_NEGATIVE,
    "train.eval_batches": POSITIVE,
    "train.save_interval": POSITIVE,
    "train.keep_last": POSITIVE,
    "train.max_nonfinite_steps": POSITIVE,
    "train.dead_code_warn_fraction": Range(0, 1, low_open=True),
    "train.imbalance_warn_ratio": Range(1),
    "train.peak_tflops": Range(0, low_open=True),
    "finetune.head_dropout": BELOW_ONE,
    "finetune.micro_batch_size": POSITIVE,
    "finetune.steps": POSITIVE,
    "finetune.warmup_fraction": BELOW_ONE,
}


def _example(cls: type, name: str, where: Range) -> str:
    """A value of ``where`` to suggest: the field's default when it is in range."""
    default = {f.name: f.default for f in dataclasses.fields(cls)}.get(name)
    number = isinstance(default, (int, float)) and not isinstance(default, bool)
    return f" (e.g. {default:g})" if number and where.holds(default) else ""


def check_ranges(cfg: RunConfig) -> None:
    """Every numeric setting within its range (None, where allowed, means "not set")."""
    for key, where in RANGES.items():
        section, name = key.split(".")
        part = getattr(cfg, section, None)
        if part is None:
            continue
        value = getattr(part, name)
        if value is not None and not where.holds(value):
            raise ConfigError(
                f"{key}={value!r} is out of range: use a value {where}"
                f"{_example(type(part), name, where)}"
            )


def _divisor_hint(total: int, part: int) -> str:
    """The divisors of ``total`` up to 8 as a suggestion for ``part``."""
    divisors = [d for d in range(1, min(total, 8) + 1) if total % d == 0 and d != part]
    return ", ".join(str(d) for d in divisors)


def _refuse_indivisible(setting: str, value: int, by: str, size: int, extra: str = "") -> None:
    if value % size:
        raise ConfigError(
            f"{setting}={value} is not divisible by {by}={size}: use {setting} a multiple of "
            f"{size} (e.g. {(value // size + 1) * size}) or {by} one of "
            f"{_divisor_hint(value, size)}{extra}"
        )


def check_combinations(cfg: RunConfig) -> None:
    """Settings that contradict each other, whatever the world size."""
    model, moe = cfg.model, cfg.moe
    heads = model.num_attention_heads
    _refuse_indivisible("model.hidden_size", model.hidden_size, "model.num_attention_heads", heads)
    groups = model.num_query_groups
    if groups is not None and model.num_attention_heads % groups:
        raise ConfigError(
            f"model.num_query_groups={groups} does not divide model.num_attention_heads="
            f"{model.num_attention_heads}: use one of "
            f"{_divisor_hint(model.num_attention_heads, groups)} or null"
        )
    head_dim = model.hidden_size // model.num_attention_heads
    if model.position_embedding_type == "rope" and head_dim % 2:
        raise ConfigError(
            f"rotary embeddings need an even head size, but model.hidden_size / "
            f"model.num_attention_heads = {head_dim}: change either, or use "
            "model.position_embedding_type=learned_absolute"
        )
    if moe.num_experts and moe.topk > moe.num_experts:
        raise ConfigError(
            f"moe.topk={moe.topk} exceeds moe.num_experts={moe.num_experts}: use moe.topk "
            f"between 1 and {moe.num_experts}"
        )
    if moe.router == "smoe_dropout" and moe.num_experts:
        k_min = moe.smoe_dropout_k_min or moe.topk
        k_max = moe.smoe_dropout_k_max or moe.num_experts
        k_eval = moe.smoe_dropout_eval_k or moe.num_experts
        if not k_min <= k_max <= moe.num_experts or k_eval > moe.num_experts:
            raise ConfigError(
                f"moe.smoe_dropout_k_min={k_min}, k_max={k_max}, eval_k={k_eval}: need "
                f"k_min <= k_max <= moe.num_experts={moe.num_experts} and eval_k <= num_experts"
            )
    if moe.router == "stablemoe" and moe.topk != 1:
        raise ConfigError(
            f"moe.router=stablemoe routes each token to one expert, but moe.topk={moe.topk}: "
            "set moe.topk=1"
        )
    if moe.topk == 1 and not moe.pre_softmax and not moe.reference_router:
        raise ConfigError(
            "moe.pre_softmax=false with moe.topk=1 gives every token weight 1 (no router "
            "gradient); set moe.pre_softmax=true, or moe.reference_router=true to reproduce that"
        )
    train = cfg.train
    if train.min_lr > train.lr:
        raise ConfigError(
            f"train.min_lr={train.min_lr:g} is above train.lr={train.lr:g}: use a train.min_lr "
            f"between 0 and {train.lr:g}"
        )


def check_layout(cfg: RunConfig, world_size: int) -> None:
    """Settings that must fit the parallel layout of ``world_size`` processes."""
    model, moe, par = cfg.model, cfg.moe, cfg.parallel
    tp, ep = par.tensor_parallel, par.expert_parallel
    if world_size % (tp * ep):
        raise ConfigError(
            f"the world size {world_size} is not divisible by parallel.tensor_parallel={tp} x "
            f"parallel.expert_parallel={ep}: use sizes whose product divides {world_size} (e.g. "
            f"parallel.expert_parallel={math.gcd(world_size // math.gcd(world_size, tp), ep)}), "
            "or start a multiple of that many processes"
        )
    has_moe = moe.num_experts > 0
    if has_moe:
        _refuse_indivisible("moe.num_experts", moe.num_experts, "parallel.expert_parallel", ep)
    if tp > 1:
        for name in ("num_attention_heads", "ffn_hidden_size"):
            _refuse_indivisible(
                f"model.{name}", getattr(model, name), "parallel.tensor_parallel", tp
            )
        if model.num_query_groups is not None:
            _refuse_indivisible(
                "model.num_query_groups", model.num_query_groups, "parallel.tensor_parallel", tp
            )
        if has_moe:
            _refuse_indivisible(
                "moe.expert_ffn_hidden_size", moe.expert_ffn_hidden_size,
                "parallel.tensor_parallel", tp,
            )  # fmt: skip
        if has_moe and par.sequence_parallel is False:
            raise ConfigError(
                f"parallel.sequence_parallel=false with parallel.tensor_parallel={tp}: megatron "
                "trains MoE layers under tensor parallelism only with sequence parallelism; "
                "use parallel.sequence_parallel=true (or null)"
            )
        if par.sequence_parallel is not False:
            _refuse_indivisible(
                "model.seq_length", model.seq_length, "parallel.tensor_parallel", tp,
                " (sequence parallelism splits the sequence)",
            )  # fmt: skip
    if model.vocab_size is not None:
        check_vocabulary(model.vocab_size, tp)
    if cfg.train.deepspeed_config:
        from vqmoe_megatron.deepspeed_config import deepspeed_config

        micro, setting = _micro_batch(cfg)
        deepspeed_config(cfg.train, micro, world_size // tp, setting)


def check_vocabulary(vocab_size: int, tensor_parallel: int) -> None:
    """The padded vocabulary (``model.padded_vocab_size``) splits evenly over TP."""
    from vqmoe_megatron.model import padded_vocab_size

    try:
        padded_vocab_size(vocab_size, tensor_parallel)
    except ValueError as exc:
        raise ConfigError(
            f"{exc} (model.vocab_size {vocab_size}): use a parallel.tensor_parallel that divides "
            "128, such as 1, 2, 4 or 8"
        ) from exc


def _micro_batch(cfg: RunConfig) -> tuple[int, str]:
    if isinstance(cfg, FinetuneConfig):
        return cfg.finetune.micro_batch_size, "finetune.micro_batch_size"
    return cfg.data.micro_batch_size, "data.micro_batch_size"


def check_settings(cfg: RunConfig, world_size: int) -> None:
    """Ranges, combinations and the layout of ``world_size`` processes (see module docstring)."""
    check_ranges(cfg)
    check_combinations(cfg)
    check_layout(cfg, world_size)


def check_output_dir(setting: str, path: str) -> None:
    """``path`` is a directory, or one can be made there (no file in the way)."""
    blocking = file_in_the_way(path)
    if blocking is not None:
        raise ConfigError(
            f"{setting}={path}: {blocking} is a file, not a directory; choose another {setting}"
        )
