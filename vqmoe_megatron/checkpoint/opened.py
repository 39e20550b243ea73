"""Open whatever checkpoint path a user gave: one answer for resume, fine-tuning's
``--pretrained``, conversion and evaluation.

:func:`open_checkpoint` accepts

* a run directory, its ``checkpoints/`` or a ``checkpoints/step_*`` directory: a training
  checkpoint (the newest complete step, checked intact), of pretraining or of fine-tuning;
* a consolidated directory (``vqmoe-convert consolidated``, or a fine-tuning run's ``best/``);
* a Hugging Face export (``vqmoe-convert hf``): its ``config.json`` read back as the backbone
  config, its weights through the inverse of the export's name mapping
  (:mod:`.hf_export`), its ``tokenizer.model``; an export made with ``--routing discrete``
  opens like a discrete-mode checkpoint;

and answers with a :class:`Checkpoint`: the resolved directory, its kind, the backbone's run
config, the fine-tuning settings when a fine-tuning run wrote it (its GPT's tensors then sit
under ``gpt.``, beside the task head's ``head.``), the tokenizer it records and its routing mode.
:meth:`Checkpoint.load_weights` loads it into a model at any layout. The "consolidated or
training checkpoint?" question is answered here only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from vqmoe_megatron.checkpoint.consolidated import (
    CONFIG,
    RECORD,
    TOKENIZER,
    WEIGHTS,
    consolidated_problem,
    conversion_kind,
    is_consolidated,
    load_full_tensors,
    read_tensors,
)
from vqmoe_megatron.checkpoint.errors import CheckpointError
from vqmoe_megatron.checkpoint.files import read_json_record
from vqmoe_megatron.checkpoint.hf_export import (
    HF_CONFIG,
    HF_WEIGHTS,
    IGNORED_BUFFERS,
    read_hf_config,
    read_hf_tensors,
)
from vqmoe_megatron.checkpoint.training import (
    COMPLETE,
    CheckpointManager,
    check_backbone,
    checkpoint_problem,
    load_model_weights,
    model_signature,
    resolve_checkpoint,
)
from vqmoe_megatron.config import (
    ConfigError,
    FinetuneConfig,
    FinetuneSettings,
    PretrainConfig,
    from_dict,
    read_yaml,
)
from vqmoe_megatron.data import DataError, load_manifest

TRAINING = "training"
CONSOLIDATED = "consolidated"
HF = "hf"
GPT_PREFIX = "gpt."
"""Where a fine-tuning run's checkpoint keeps its GPT's tensors (``SequenceClassifier.gpt``)."""


@dataclass(frozen=True)
class Checkpoint:
    """The weights at a path, and what they were trained as."""

    path: Path
    """The training step directory or the consolidated directory."""
    kind: str
    """:data:`TRAINING`, :data:`CONSOLIDATED` or :data:`HF`."""
    cfg: PretrainConfig
    """The run config of the backbone: a fine-tuning run's ``model``, ``moe``, ``parallel`` and
    ``train`` sections (its ``data`` is the default)."""
    task: Optional[FinetuneSettings] = None
    """The fine-tuning settings (task, pooling, ...) of a fine-tuning run's checkpoint."""
    tokenizer: dict = field(default_factory=dict)
    """The tokenizer a training checkpoint records (``TrainerState.tokenizer``; may be empty)."""

    @property
    def routing_mode(self) -> str:
        """``pretrain`` (router and gate present) or ``discrete`` (nearest code only)."""
        return self.cfg.moe.routing_mode

    @property
    def prefix(self) -> str:
        """Where the GPT's tensors sit: ``gpt.`` in a fine-tuning run's checkpoint, else ``""``."""
        return GPT_PREFIX if self.task is not None else ""

    def tokenizer_model(self) -> Optional[Path]:
        """The sentencepiece model it was trained with, when that file is there: the
        consolidated copy, the model of the run's data manifest (data.data_dir, or the first of
        data.sources: they share one tokenizer), or the file the checkpoint records."""
        if self.kind in (CONSOLIDATED, HF) and (self.path / TOKENIZER).is_file():
            return self.path / TOKENIZER
        data = self.cfg.data
        data_dir = data.data_dir or (data.sources[0].path if data.sources else None)
        if data_dir is not None:
            try:
                model = Path(load_manifest(data_dir).tokenizer_model)
            except DataError:
                model = None
            if model is not None and model.is_file():
                return model
        recorded = self.tokenizer.get("model")
        return Path(recorded) if recorded and Path(recorded).is_file() else None

    def load_weights(self, model: torch.nn.Module, cfg: Any, with_head: bool = False) -> None:
        """Load into ``model`` at its layout (collective); ``cfg`` (model and moe sections)
        describes it and must have the checkpoint's structure but for the routing mode.

        ``model`` is the GPT (a fine-tuning run's head is then not read), or with ``with_head``
        a module laid out as the fine-tuning run's (GPT and ``head``).
        """
        if with_head and self.task is None:
            raise CheckpointError(f"{self.path} was written by pretraining: it has no task head")
        prefix = "" if with_head else self.prefix
        if self.kind == TRAINING:
            load_model_weights(model, self.path, cfg, prefix)
            return
        check_backbone(model_signature(self.cfg), model_signature(cfg), self.path)
        if self.kind == HF:
            tensors = {**untrained_statistics(model), **read_hf_tensors(self.path, self.cfg)}
            load_full_tensors(model, tensors, self.path / HF_WEIGHTS)
            return
        tensors = read_tensors(self.path)
        if prefix:
            tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        load_full_tensors(model, tensors, self.path / WEIGHTS)


def untrained_statistics(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The codebook statistics an HF export leaves out (:data:`IGNORED_BUFFERS`), as ``model``
    has them, but marked initialised: the exported codebook is trained, never re-drawn."""
    out = {}
    for key, value in model.state_dict().items():
        if IGNORED_BUFFERS.search(key):
            out[key] = torch.zeros_like(value) if key.endswith("needs_data_init") else value
    return out


def read_run_config(file: Path) -> tuple[PretrainConfig, Optional[FinetuneSettings]]:
    """The backbone config and (for a fine-tuning run's) the fine-tuning settings of a
    checkpoint's ``config.yaml``."""
    try:
        raw = read_yaml(file)
        if "finetune" not in raw:
            return from_dict(PretrainConfig, raw, str(file)), None
        run = from_dict(FinetuneConfig, raw, str(file))
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"cannot read the config of checkpoint {file.parent}: {exc}") from exc
    backbone = PretrainConfig(model=run.model, moe=run.moe, parallel=run.parallel, train=run.train)
    return backbone, run.finetune


def _check_consolidated(path: Path) -> None:
    """Refuse a damaged consolidated directory, naming the file and what to use instead."""
    problem = consolidated_problem(path)
    if not problem:
        return
    try:
        source = read_json_record(path / RECORD).get("source")
    except ValueError:
        source = None
    intact = source and (Path(source) / COMPLETE).is_file() and not checkpoint_problem(source)
    advice = (
        f"it was converted from {source}, which is intact: convert that again"
        if intact
        else "convert its training checkpoint again"
    )
    raise CheckpointError(f"consolidated checkpoint {path} is damaged: {problem}; {advice}")


def open_checkpoint(path: Union[str, Path]) -> Checkpoint:
    """The intact checkpoint meant by ``path`` (see the module docstring); a damaged one is
    refused naming the file and what to use instead."""
    path = Path(path)
    if conversion_kind(path) == HF or (path / HF_CONFIG).is_file():
        cfg = read_hf_config(path)
        if not (path / HF_WEIGHTS).is_file():
            raise CheckpointError(f"{path / HF_WEIGHTS} is missing: export the checkpoint again")
        return Checkpoint(path, HF, cfg)
    if is_consolidated(path) or (path / WEIGHTS).is_file():
        _check_consolidated(path)
        cfg, task = read_run_config(path / CONFIG)
        return Checkpoint(path, CONSOLIDATED, cfg, task)
    step_dir = resolve_checkpoint(path)
    cfg, task = read_run_config(step_dir / CONFIG)
    recorded = CheckpointManager.read_state(step_dir).tokenizer
    return Checkpoint(step_dir, TRAINING, cfg, task, recorded)


def resolve_pretrained(path: Union[str, Path]) -> Path:
    """The intact step or consolidated directory meant by ``path``."""
    return open_checkpoint(path).path


def pretrained_config(path: Union[str, Path]) -> PretrainConfig:
    """The backbone's run config of the checkpoint at ``path``."""
    return open_checkpoint(path).cfg


def load_pretrained(gpt: torch.nn.Module, path: Union[str, Path], cfg: PretrainConfig) -> None:
    """Load the GPT weights of the checkpoint at ``path`` into ``gpt`` (collective)."""
    open_checkpoint(path).load_weights(gpt, cfg)


def read_consolidated(path: Union[str, Path]) -> tuple[PretrainConfig, dict[str, torch.Tensor]]:
    """The backbone's run config and the full tensors of the consolidated directory (or HF
    export: the project's names, without the codebook statistics) ``path``."""
    checkpoint = open_checkpoint(path)
    if checkpoint.kind == HF:
        return checkpoint.cfg, read_hf_tensors(checkpoint.path, checkpoint.cfg)
    return checkpoint.cfg, read_tensors(checkpoint.path)
