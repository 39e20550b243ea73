"""Consolidated checkpoints: one safetensors file of full fp32 tensors + the run config.

Layout of a consolidated directory::

    model.safetensors   every parameter as a full tensor under its global name (local expert i
                        of EP rank r is expert r * L + i), plus the persistent buffers
                        (codebook statistics); fp32
    config.yaml         the resolved PretrainConfig of the run (structure + routing settings)
    tokenizer.model     the sentencepiece model, when known
    conversion.json     what vqmoe-convert did, with the size of every other file (checked
                        before the directory is used; older directories lack the sizes)

A fine-tuning run's ``best/`` has the same layout (its tensors under ``gpt.`` and ``head.``, its
fine-tuning config, ``best.json`` instead of ``conversion.json``). It loads into a model built at
any tensor/expert-parallel layout, and into a ``discrete`` model from a ``pretrain`` one (the
router and gate weights are dropped, nothing else may be). :mod:`.opened` tells such a directory
from a training checkpoint, so every consumer takes either.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vqmoe_megatron.checkpoint.errors import CheckpointError
from vqmoe_megatron.checkpoint.files import read_json_record, recorded_problem
from vqmoe_megatron.config import PretrainConfig, dump_yaml
from vqmoe_megatron.parallel_tensors import gather_full_tensors, is_expert_param, shard_full_tensors

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


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The full tensors of consolidated directory ``path`` (a clear error when damaged)."""
    file = Path(path) / WEIGHTS
    try:
        return load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(f"{file} is damaged or truncated ({exc})") from exc


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
