"""Where a fine-tuning run's model comes from: the pretrained checkpoint's config, tokenizer and
weights, and the run config built on them.

``finetune.pretrained`` is any path :func:`~vqmoe_megatron.checkpoint.opened.open_checkpoint`
takes, also a fine-tuning run of another task (intermediate-task fine-tuning, e.g. MNLI then
RTE): its backbone and codebooks load; its head is kept only for the same task and pooling, else
the new task's head starts afresh (the log says which).

The run config starts from the checkpoint's ``model`` and ``moe`` sections (the structure must
be the checkpoint's; non-structural settings such as dropout may be overridden; a fine-tuning
run's routing settings carry over), then the optional YAML file, then ``section.key=value``
overrides. ``finetune.routing``,
``train_codebook`` and ``vq_loss`` are then written into ``moe`` (routing_mode,
train_codebook_in_discrete, vq_loss_in_discrete; vq_loss_coeff 0 when the loss is off), so the
resolved config says what the model was built with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

from vqmoe_megatron.checkpoint.errors import CheckpointError
from vqmoe_megatron.checkpoint.opened import Checkpoint, open_checkpoint
from vqmoe_megatron.checkpoint.training import ROUTING_MODE, model_signature, signature_diffs
from vqmoe_megatron.config import (
    ConfigError,
    FinetuneConfig,
    MoEConfig,
    PretrainConfig,
    from_dict,
    merge,
    parse_overrides,
    read_yaml,
    refuse_derived_settings,
    to_dict,
)
from vqmoe_megatron.convert.source import open_source
from vqmoe_megatron.data import Tokenizer
from vqmoe_megatron.finetune.classifier import SequenceClassifier
from vqmoe_megatron.glue.tasks import get_task


def open_pretrained(path: Union[str, Path]) -> Checkpoint:
    """The checkpoint at ``path`` (pretraining or fine-tuning run, step or consolidated
    directory); refuses paths that do not exist."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"pretrained checkpoint {path} does not exist; give a pretraining or fine-tuning run "
            "directory, its checkpoints/ or a checkpoints/step_* directory, or a consolidated "
            "directory (a fine-tuning run's best/ is one)"
        )
    return open_checkpoint(path)


def read_pretrained_config(path: Union[str, Path]) -> PretrainConfig:
    """The backbone's run config stored with ``path`` (see :func:`open_pretrained`)."""
    return open_pretrained(path).cfg


def load_pretrained_weights(model: SequenceClassifier, cfg: FinetuneConfig) -> str:
    """Load ``finetune.pretrained`` into ``model`` (collective); returns the log line saying what
    was loaded.

    The backbone always loads. A fine-tuning run's head loads too when that run had this task
    and pooling; otherwise (another task, or a pretraining checkpoint) ``model``'s head keeps its
    fresh initialisation.
    """
    ft = cfg.finetune
    checkpoint = open_pretrained(ft.pretrained)
    backbone = PretrainConfig(model=cfg.model, moe=cfg.moe)
    source = checkpoint.task
    line = f"loaded {ft.pretrained} ({ft.routing} routing)"
    if source is not None and (source.task, source.pooling) == (ft.task, ft.pooling):
        checkpoint.load_weights(model, backbone, with_head=True)
        return f"{line} with the {source.task} head it was fine-tuned with"
    checkpoint.load_weights(model.gpt, backbone)
    if source is None:
        return line
    labels = get_task(source.task).num_labels
    return (
        f"{line}: fine-tuned on {source.task} ({labels} labels, {source.pooling} pooling); its "
        f"backbone and codebooks carry over, its head is dropped and a new {ft.task} head "
        f"({get_task(ft.task).num_labels} labels, {ft.pooling} pooling) is initialised"
    )


def resolve_tokenizer(
    pretrained: Union[str, Path], explicit: Optional[str] = None, *, allow_change: bool = False
) -> Tokenizer:
    """The tokenizer to fine-tune ``pretrained`` with: ``explicit``, else the one the checkpoint
    records (the consolidated copy or its data manifest's; ``convert.source``).

    Its vocabulary must be the model's; it must also be the very file the checkpoint was
    trained with (same sha256) unless ``allow_change`` (``train.allow_tokenizer_change``).
    """
    pretrained = Path(pretrained)
    source = open_source(
        pretrained,
        Path(explicit) if explicit else None,
        require_tokenizer=True,
        allow_tokenizer_change=allow_change,
    )
    recorded = source.checkpoint.tokenizer_model() if explicit else None
    if recorded is not None and not allow_change:
        expected = Tokenizer(recorded).sha256
        if source.tokenizer.sha256 != expected:
            raise CheckpointError(
                f"tokenizer {explicit} is not the one {pretrained} was pretrained with "
                f"({recorded}; sha256 {expected[:12]}... vs {source.tokenizer.sha256[:12]}...); "
                "pass that file, or leave --tokenizer out (or set train.allow_tokenizer_change=true)"
            )
    return source.tokenizer


def load_finetune_config(
    config_path: Optional[Union[str, Path]], overrides: Sequence[str]
) -> FinetuneConfig:
    """The resolved fine-tuning config (see the module docstring)."""
    data = read_yaml(config_path) if config_path is not None else {}
    source = str(config_path) if config_path is not None else "defaults"
    updates = parse_overrides(overrides)
    from_dict(FinetuneConfig, data, source)
    from_dict(FinetuneConfig, updates, "command line")
    given = merge(data, updates)
    refuse_derived_settings(data, source)
    refuse_derived_settings(updates, "command line")
    settings = from_dict(FinetuneConfig, {"finetune": given.get("finetune", {})}).finetune
    for name, flag in (
        ("task", "--task"),
        ("data_dir", "--data_dir"),
        ("pretrained", "--pretrained"),
    ):
        if getattr(settings, name) is None:
            raise ConfigError(f"finetune.{name} is not set: pass {flag}")
    checkpoint = open_pretrained(settings.pretrained)
    pretrained = checkpoint.cfg
    base = to_dict(FinetuneConfig())
    base["model"], base["moe"] = to_dict(pretrained.model), to_dict(pretrained.moe)
    cfg = from_dict(FinetuneConfig, merge(base, given), source)
    task = get_task(cfg.finetune.task).name
    cfg = replace(
        cfg,
        finetune=replace(cfg.finetune, task=task),
        train=replace(cfg.train, output_dir=cfg.train.output_dir or f"runs/glue/{task}"),
    )
    _check_structure(cfg, pretrained, settings.pretrained)
    return _apply_finetune_settings(cfg, checkpoint, settings.pretrained)


def _check_structure(cfg: FinetuneConfig, pretrained: PretrainConfig, path: str) -> None:
    ours = model_signature(PretrainConfig(model=cfg.model, moe=cfg.moe))
    diffs = signature_diffs(model_signature(pretrained), ours, "given", ignore=(ROUTING_MODE,))
    if diffs:
        raise ConfigError(
            f"the model's structure comes from the pretrained checkpoint {path}; these overrides "
            f"change it: {'; '.join(diffs)}. Drop them"
        )


def fine_tune_routing(moe: MoEConfig) -> str:
    """The default fine-tune routing of a pretrained model: 'discrete' for VQMoE (METHOD.md
    section 3), 'pretrain' (its own router) for every other router."""
    return "discrete" if moe.router == "vqmoe" else "pretrain"


def fine_tune_router(moe: MoEConfig) -> MoEConfig:
    """The router settings a fine-tuning run trains with: the router's final routing.

    SMoE-Dropout routes with ``smoe_dropout_eval_k`` experts (no ramp); StableMoE with its
    distilled router, frozen (stage 2 from the first step); VQMoE without the pretraining-only
    options of METHOD.md section 8 (router alignment, gate loss, discrete phase).
    """
    if moe.router == "vqmoe":
        return replace(
            moe, router_alignment_coeff=0.0, gate_discrete_coeff=0.0, discrete_phase_start=None
        )
    if moe.router == "smoe_dropout":
        k = moe.smoe_dropout_eval_k or moe.num_experts
        return replace(moe, smoe_dropout_k_min=k, smoe_dropout_k_max=k)
    if moe.router == "stablemoe":
        return replace(moe, stablemoe_stage1_steps=0)
    return moe


def _apply_finetune_settings(
    cfg: FinetuneConfig, checkpoint: Checkpoint, path: str
) -> FinetuneConfig:
    ft = cfg.finetune
    pretrained = checkpoint.cfg
    if checkpoint.task is not None and ft.vq_loss and cfg.moe.vq_loss_coeff == 0.0:
        raise ConfigError(
            f"{path} was fine-tuned without the VQ loss (its moe.vq_loss_coeff is 0): set "
            "moe.vq_loss_coeff=<the pretraining value> to keep it, or pass --no_vq_loss"
        )
    if ft.routing is None:
        ft = replace(ft, routing=fine_tune_routing(pretrained.moe))
    if ft.routing == "pretrain" and pretrained.moe.routing_mode == "discrete":
        raise ConfigError(
            f"--routing pretrain keeps the router and gate, but {path} was pretrained in "
            "discrete mode and has neither; use --routing discrete"
        )
    if ft.routing == "discrete" and pretrained.moe.router != "vqmoe":
        raise ConfigError(
            f"{path} has no codebook to route by (moe.router={pretrained.moe.router}); fine-tune "
            "it with its router: --routing pretrain"
        )
    moe = replace(
        fine_tune_router(cfg.moe),
        routing_mode=ft.routing,
        train_codebook_in_discrete=ft.train_codebook,
        vq_loss_in_discrete=ft.vq_loss,
        vq_loss_coeff=cfg.moe.vq_loss_coeff if ft.vq_loss else 0.0,
    )
    return replace(cfg, finetune=ft, moe=moe)
