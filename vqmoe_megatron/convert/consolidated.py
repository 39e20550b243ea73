"""Consolidated checkpoints: one safetensors file of full fp32 tensors + the run config.

Layout of a consolidated directory::

    model.safetensors   every parameter as a full tensor under its global name (local expert i
                        of EP rank r is expert r * L + i), plus the persistent buffers
                        (codebook statistics); fp32
    config.yaml         the resolved PretrainConfig of the run (structure + routing settings)
    tokenizer.model     the sentencepiece model, when known
    conversion.json     what vqmoe-convert did, with the size of every other file (checked
                        before the directory is used; older directories lack the sizes)

It loads into a model built at any tensor/expert-parallel layout, and into a ``discrete`` model
from a ``pretrain`` one (the router and gate weights are dropped, nothing else may be).
:func:`load_pretrained` accepts such a directory or a training checkpoint (run directory,
``checkpoints/`` or ``checkpoints/step_*``), so every consumer takes either.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vqmoe_megatron.config import ConfigError, PretrainConfig, dump_yaml, load_config
from vqmoe_megatron.parallel_tensors import gather_full_tensors, is_expert_param, shard_full_tensors
from vqmoe_megatron.training.checkpoint import (
    CheckpointError,
    check_signature,
    checkpoint_problem,
    load_model_weights,
    model_signature,
    read_checkpoint_config,
    resolve_checkpoint,
)
from vqmoe_megatron.training.checkpoint_files import read_json_record, recorded_problem

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.model"
RECORD = "conversion.json"
ROUTER_ONLY_KEYS = (".router.continuous.", ".router.gate.")
"""Weights that exist only in ``pretrain`` routing mode."""


def conversion_kind(path: Path) -> Optional[str]:
    """The ``kind`` its ``conversion.json`` gives an output of vqmoe-convert (None: no readable
    record)."""
    try:
        kind = read_json_record(Path(path) / RECORD).get("kind")
    except ValueError:
        return None
    return kind if isinstance(kind, str) else None


def is_consolidated(path: Path) -> bool:
    """Whether ``path`` is a consolidated directory."""
    path = Path(path)
    kind = conversion_kind(path)
    if kind is not None:
        return kind == "consolidated"
    return (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def consolidated_problem(path: Path) -> Optional[str]:
    """The first missing or damaged file of consolidated directory ``path``, or None."""
    if (path / RECORD).is_file():
        try:
            files = read_json_record(path / RECORD).get("files")
        except ValueError as exc:
            return str(exc)
        problem = recorded_problem(path, files) if isinstance(files, dict) else None
        if problem:
            return problem
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            return f"{path / name} is missing"
    return None


def resolve_pretrained(path: Path) -> Path:
    """The intact consolidated directory or training step directory meant by ``path`` (see
    :func:`~vqmoe_megatron.training.checkpoint.resolve_checkpoint`); a damaged one is refused
    naming the file and what to use instead."""
    path = Path(path)
    kind = conversion_kind(path)
    if kind == "hf":
        raise CheckpointError(
            f"{path} is a Hugging Face export (load it with transformers); give the training "
            "checkpoint it came from or a consolidated directory"
        )
    if not (is_consolidated(path) or (path / WEIGHTS).is_file()):
        return resolve_checkpoint(path)
    problem = consolidated_problem(path)
    if problem:
        try:
            source = read_json_record(path / RECORD).get("source")
        except ValueError:
            source = None
        intact = source and (Path(source) / "COMPLETE").is_file() and not checkpoint_problem(source)
        advice = (
            f"it was converted from {source}, which is intact: convert that again"
            if intact
            else "convert its training checkpoint again"
        )
        raise CheckpointError(f"consolidated checkpoint {path} is damaged: {problem}; {advice}")
    return path


def persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that belong in a checkpoint (state-dict entries that are not parameters)."""
    params = {name for name, _ in model.named_parameters()}
    return {
        key: value
        for key, value in model.state_dict().items()
        if key not in params
        and isinstance(value, torch.Tensor)
        and not key.endswith("_extra_state")
    }


def full_state_dict(gpt: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters at their global shapes and persistent buffers, on CPU (collective)."""
    buffers = {k: v.detach().cpu().contiguous() for k, v in persistent_buffers(gpt).items()}
    return {**gather_full_tensors(gpt), **buffers}


def write_consolidated(
    gpt: torch.nn.Module,
    cfg: PretrainConfig,
    out_dir: Path,
    tokenizer_model: Optional[Path] = None,
) -> Path:
    """Write ``gpt`` (any layout) as a consolidated directory; collective, rank 0 writes."""
    params = {name for name, _ in gpt.named_parameters()}
    tensors = {k: v.float() if k in params else v for k, v in full_state_dict(gpt).items()}
    rank = dist.get_rank() if dist.is_initialized() else 0
    out_dir = Path(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f"{WEIGHTS}.tmp"
        try:
            save_file(tensors, str(tmp), metadata={"format": "vqmoe-consolidated-v1"})
        except SafetensorError as exc:  # its I/O errors (a full disk) are not OSErrors
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"cannot write {out_dir / WEIGHTS}: {exc}") from exc
        tmp.replace(out_dir / WEIGHTS)
        dump_yaml(cfg, out_dir / CONFIG)
        if tokenizer_model is not None:
            shutil.copyfile(tokenizer_model, out_dir / TOKENIZER)
    if dist.is_initialized():
        dist.barrier()
    return out_dir


def read_consolidated(path: Path) -> tuple[PretrainConfig, dict[str, torch.Tensor]]:
    """Config and full tensors of a consolidated directory (clear errors when damaged)."""
    path = Path(path)
    cfg = pretrained_config(path)
    try:
        tensors = load_file(str(path / WEIGHTS))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(f"{path / WEIGHTS} is damaged or truncated ({exc})") from exc
    return cfg, tensors


def pretrained_config(path: Path) -> PretrainConfig:
    """The run config of a consolidated directory or training checkpoint."""
    path = resolve_pretrained(path)
    if is_consolidated(path):
        try:
            return load_config(PretrainConfig, path / CONFIG)
        except ConfigError as exc:
            raise CheckpointError(f"{path / CONFIG}: {exc}") from exc
    return read_checkpoint_config(path)


def load_full_tensors(gpt: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load full global tensors into ``gpt`` at its layout; router/gate extras are dropped."""
    wanted = set(gpt.state_dict())
    # experts of other EP ranks appear under global names this rank does not hold
    extra = [k for k in tensors if k not in wanted and not is_expert_param(k)]
    unexpected = [k for k in extra if not any(part in k for part in ROUTER_ONLY_KEYS)]
    if unexpected:
        raise CheckpointError(
            f"{source} holds tensors this model does not have, e.g. {unexpected[:3]}; build the "
            "model with the checkpoint's config"
        )
    try:
        local = shard_full_tensors(gpt, tensors)
    except KeyError as exc:
        raise CheckpointError(f"{source} lacks weights of this model: {exc}") from exc
    local.update({k: v for k, v in tensors.items() if k in wanted and k not in local})
    missing = sorted(wanted - set(local) - {k for k in wanted if k.endswith("_extra_state")})
    if missing:
        raise CheckpointError(
            f"{source} lacks {len(missing)} tensors of this model, e.g. {missing[:3]}"
        )
    own = gpt.state_dict()
    wrong = [
        f"{key}: {tuple(value.shape)} in the file, {tuple(own[key].shape)} expected"
        for key, value in local.items()
        if isinstance(own.get(key), torch.Tensor) and value.shape != own[key].shape
    ]
    if wrong:
        raise CheckpointError(
            f"{source} does not fit the model its config describes: {len(wrong)} tensors have "
            f"other shapes, e.g. {'; '.join(wrong[:2])}"
        )
    gpt.load_state_dict(local, strict=False)


def load_pretrained(gpt: torch.nn.Module, path: Path, cfg: PretrainConfig) -> None:
    """Load weights from a consolidated directory or a training checkpoint (collective)."""
    path = resolve_pretrained(path)
    if is_consolidated(path):
        saved, tensors = read_consolidated(path)
        check_signature(
            model_signature(saved), model_signature(cfg), path, ignore=("moe.routing_mode",)
        )
        load_full_tensors(gpt, tensors, path / WEIGHTS)
    else:
        load_model_weights(gpt, path, cfg)
