"""Sharding split over many machines: parts (a slurm array job's tasks), then one merge.

Part ``i`` of ``n`` takes a contiguous run of the sorted input files: file ``f`` belongs to the
part its first byte falls in when the inputs' total size is cut into ``n`` equal ranges (a file
is never split; a part may be empty). The part tokenizes its files exactly as a single-machine
run does and writes, under ``OUTPUT/.parts/part-IIIII-of-NNNNN/``, each split's token ids in
input order (``train.ids``, ``valid.ids``: raw little-endian ids of the manifest's dtype, each
document's ids followed by EOS) and, last, ``part.json`` (the corpus fingerprint, the chunk
records with their global file numbers, and each ids file's size and sha256). A part with a
valid ``part.json`` and matching files is finished; running it again only verifies it.

The merge checks that every part is finished, then feeds the parts' streams in order through the
single-machine packer and shard writer (``sharding.SplitWriter``, staged and swapped in by
``ShardWorkspace``): each split's stream is the concatenation of the parts' streams, which is
the single-machine stream, so the shards are byte-identical to ``build_shards`` on the same
inputs and settings, and so is the manifest except ``created`` and ``settings`` (``workers``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqmoe_megatron.data.errors import DataError
from vqmoe_megatron.data.files import write_json_atomic
from vqmoe_megatron.data.manifest import SPLITS
from vqmoe_megatron.data.shard_workspace import ShardWorkspace, fingerprint
from vqmoe_megatron.data.sharding import (
    ShardPlan,
    ShardSettings,
    finish_shards,
    open_writer,
    plan_shards,
    tokenized,
)

PARTS_DIR = ".parts"
PART_FILE = "part.json"
_BLOCK_IDS = 1 << 22


def part_files(sizes: list[int], part: int, parts: int) -> range:
    """The input files ``[start, end)`` of part ``part`` of ``parts`` (see module docstring)."""
    total = max(sum(sizes), 1)
    owners, start = [], 0
    for size in sizes:
        owners.append(min(start * parts // total, parts - 1))  # empty files at the end: last part
        start += size
    return range(bisect_left(owners, part), bisect_left(owners, part + 1))


def part_dir(output: Path, part: int, parts: int) -> Path:
    return output / PARTS_DIR / f"part-{part:05d}-of-{parts:05d}"


def check_mode(part: int | None, parts: int | None, merge: bool) -> None:
    """Refuse a combination of shard.py's ``--part``, ``--parts`` and ``--merge`` that means
    nothing (none of them: a single-machine run)."""
    if (part is not None or merge) and parts is None:
        raise DataError("--part and --merge need --parts N (the number of parts of the run)")
    if part is not None and merge:
        raise DataError("pass --part I (tokenize one part) or --merge (join them), not both")
    if parts is not None and part is None and not merge:
        raise DataError("--parts needs --part I or --merge")
    if parts is not None:
        _check_part_numbers(0 if part is None else part, parts)


def _check_part_numbers(part: int, parts: int) -> None:
    if parts < 1 or not 0 <= part < parts:
        raise DataError(f"need 0 <= --part < --parts and --parts >= 1 (got {part}, {parts})")


@dataclass(frozen=True)
class PartInfo:
    """A finished part as its ``part.json`` describes it."""

    folder: Path
    records: list[dict]
    splits: dict[str, dict]


def _read_part(plan: ShardPlan, folder: Path, part: int, parts: int) -> PartInfo | None:
    """The part's description if ``part.json`` belongs to this corpus and partition and every
    ids file has its recorded size (sha256: see ``verify_part`` / the merge); else None."""
    try:
        raw = json.loads((folder / PART_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    expected = {"fingerprint": fingerprint(plan.identity), "part": part, "parts": parts}
    if any(raw.get(key) != value for key, value in expected.items()):
        return None
    itemsize = np.dtype(plan.dtype).itemsize
    for split in SPLITS:
        path = folder / f"{split}.ids"
        if not path.is_file() or path.stat().st_size != raw["splits"][split]["tokens"] * itemsize:
            return None
    return PartInfo(folder, raw["records"], raw["splits"])


def _stream(plan: ShardPlan, info: PartInfo, split: str) -> Iterator[np.ndarray]:
    """The ids of one split of a part, in blocks; DataError at the end if the sha256 differs."""
    digest = hashlib.sha256()
    dtype = np.dtype(plan.dtype).newbyteorder("<")
    path = info.folder / f"{split}.ids"
    with open(path, "rb") as f:
        while block := f.read(_BLOCK_IDS * dtype.itemsize):
            digest.update(block)
            yield np.frombuffer(block, dtype=dtype)
    if digest.hexdigest() != info.splits[split]["sha256"]:
        raise DataError(
            f"{path} differs from its {PART_FILE} (sha256); delete {info.folder} and run that "
            "part again"
        )


def _verified(plan: ShardPlan, info: PartInfo) -> bool:
    """Whether every ids file of a part has its recorded sha256 (reads them all)."""
    try:
        for split in SPLITS:
            deque(_stream(plan, info, split), maxlen=0)
    except DataError:
        return False
    return True


def write_part(
    settings: ShardSettings,
    part: int,
    parts: int,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Tokenize part ``part`` of ``parts`` into its part folder (see module docstring) and
    return its ``part.json``; a finished, verified part is left as it is."""
    _check_part_numbers(part, parts)
    plan = plan_shards(settings)
    folder = part_dir(Path(settings.output), part, parts)
    files = part_files([s.size for s in plan.sources], part, parts)
    info = _read_part(plan, folder, part, parts)
    if info is not None and _verified(plan, info):
        log(f"part {part} of {parts} is finished (verified); nothing to do")
        return json.loads((folder / PART_FILE).read_text(encoding="utf-8"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sources = plan.sources[files.start : files.stop]
    digests = {split: hashlib.sha256() for split in SPLITS}
    tokens = dict.fromkeys(SPLITS, 0)
    records = []
    with contextlib.ExitStack() as files_open:
        outputs = {
            split: files_open.enter_context(open(folder / f"{split}.ids.tmp", "wb"))
            for split in SPLITS
        }
        for results in tokenized(plan, sources, progress=progress) if sources else ():
            for result in results:
                records.append({**result.record(), "source": files.start + result.source})
                for split, ids in zip(SPLITS, result.ids):
                    data = ids.astype(ids.dtype.newbyteorder("<"), copy=False).tobytes()
                    outputs[split].write(data)
                    digests[split].update(data)
                    tokens[split] += len(ids)
    for split in SPLITS:
        os.replace(folder / f"{split}.ids.tmp", folder / f"{split}.ids")
    description = {
        "fingerprint": fingerprint(plan.identity),
        "part": part,
        "parts": parts,
        "files": [files.start, files.stop],
        "splits": {s: {"tokens": tokens[s], "sha256": digests[s].hexdigest()} for s in SPLITS},
        "records": records,
    }
    write_json_atomic(folder / PART_FILE, description)
    log(
        f"part {part} of {parts}: input files {files.start}..{files.stop - 1} of "
        f"{len(plan.sources)}, {sum(tokens.values()):,} tokens"
    )
    return description


def merge_parts(
    settings: ShardSettings,
    parts: int,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Check that all ``parts`` parts are finished, pack their streams into OUTPUT's shards and
    manifest (as ``build_shards`` would) and remove the part folders; return the manifest."""
    _check_part_numbers(0, parts)
    plan = plan_shards(settings)
    output = Path(settings.output)
    workspace = ShardWorkspace(
        output, plan.identity, overwrite=settings.overwrite, progress=progress
    )
    finished = workspace.up_to_date()
    if finished is not None:
        log(f"{output} is up to date ({len(workspace.valid)} shards verified); nothing to do")
        return finished
    infos = [_read_part(plan, part_dir(output, k, parts), k, parts) for k in range(parts)]
    missing = [str(k) for k, info in enumerate(infos) if info is None]
    if missing:
        raise DataError(
            f"parts {','.join(missing)} of {parts} under {output / PARTS_DIR} are missing, "
            "unfinished or of other inputs or settings; run them again (e.g. "
            f"PARTS={parts} sbatch --array={','.join(missing)} slurm/shard_corpus.sh with the "
            "same arguments), then merge"
        )
    workspace.resume()
    workspace.start([])
    writer = open_writer(plan, workspace, [], dict.fromkeys(SPLITS, 0))
    for info in infos:
        for record in info.records:
            writer.totals.add(record)
        for split in SPLITS:
            for ids in _stream(plan, info, split):
                writer.append(split, ids)
    manifest = finish_shards(plan, workspace, writer)
    shutil.rmtree(output / PARTS_DIR)
    log(f"merged {parts} parts into {output}")
    return manifest
