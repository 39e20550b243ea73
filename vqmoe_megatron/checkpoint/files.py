"""Whether a checkpoint directory holds every file it was written with, checked before any
consumer (resume, conversion, evaluation, fine-tuning) reads it.

A save records the size of every file it wrote (:func:`record_files`): a training checkpoint in
``trainer_state.json``, a conversion output in ``conversion.json``. :func:`recorded_problem` names
the first file that is missing or has another size. Training checkpoints written before the
record existed are checked by structure (:func:`structural_problem`): the files every checkpoint
has, one rank file per rank of the saving layout, and the tensor files the ``dist/.metadata``
index refers to, each at least as long as the index says. The index is read with the allow-list
unpickler of :mod:`vqmoe_megatron.compat.checkpoint_io`, so a tampered one is refused here.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Optional

from vqmoe_megatron.compat.checkpoint_io import UnsafeCheckpointFile, read_metadata_safely

REQUIRED_FILES = ("config.yaml", "dist/metadata.json", "dist/.metadata", "dist/common.pt")
"""Files of every training checkpoint besides ``trainer_state.json`` and the rank files."""


def record_files(directory: Path, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """Relative path -> size in bytes of every file under ``directory`` but ``exclude``."""
    directory = Path(directory)
    return {
        path.relative_to(directory).as_posix(): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.relative_to(directory).as_posix() not in exclude
    }


def size_problem(file: Path, expected: int, at_least: bool = False) -> Optional[str]:
    """Why ``file`` is not ``expected`` bytes long (``at_least``: not shorter), or None."""
    if not file.is_file():
        return f"{file} is missing"
    size = file.stat().st_size
    if size < expected:
        return f"{file} is truncated ({size} of {expected} bytes)"
    if size != expected and not at_least:
        return f"{file} has {size} bytes, {expected} were written"
    return None


def recorded_problem(directory: Path, record: dict[str, int]) -> Optional[str]:
    """The first file of ``record`` that ``directory`` lacks or holds at another size."""
    for name, size in record.items():
        problem = size_problem(Path(directory) / name, size)
        if problem:
            return problem
    return None


def structural_problem(step_dir: Path, world_size: int) -> Optional[str]:
    """What a training checkpoint saved by ``world_size`` ranks lacks by its structure."""
    for name in REQUIRED_FILES:
        if not (step_dir / name).is_file():
            return f"{step_dir / name} is missing"
    for rank in range(world_size):
        rank_file = step_dir / "rank_states" / f"rank_{rank:05d}.pt"
        if not rank_file.is_file():
            return f"{rank_file} is missing"
    index = step_dir / "dist" / ".metadata"
    try:
        metadata = read_metadata_safely(index.read_bytes())
    except UnsafeCheckpointFile as exc:
        return f"{index} is not a checkpoint index, refusing to read it: {exc}"
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        return f"{index} is damaged ({type(exc).__name__}: {exc})"
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        problem = size_problem(step_dir / "dist" / name, end, at_least=True)
        if problem:
            return problem
    return None


def read_json_record(file: Path) -> dict:
    """A JSON object file; raises ValueError naming the file when it is missing or damaged."""
    if not file.is_file():
        raise ValueError(f"{file} is missing")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file} is damaged ({exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{file} is damaged (not a JSON object)")
    return raw
