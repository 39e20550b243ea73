"""The output directory of data_tools/shard.py: ownership, staging, resume logs and the final swap.

New shards are staged in ``OUTPUT/.incoming/`` (each written to a temp name and renamed when
complete) next to ``state.json`` (what is being built) and two append-only logs: ``chunks.jsonl``
(per input chunk, the tokens and documents it added to each split) and ``shards.jsonl`` (each
finished shard with its sha256). Only when every shard exists are they moved into OUTPUT and
``manifest.json`` replaced, so earlier outputs stay intact until a new complete set replaces
them. A directory holding another corpus's shards is refused unless ``overwrite`` is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from vqmoe_megatron.data.errors import DataError
from vqmoe_megatron.data.files import sha256_file, write_bytes_atomic, write_json_atomic
from vqmoe_megatron.data.manifest import MANIFEST_NAME

STAGING = ".incoming"
STATE = "state.json"
CHUNK_LOG = "chunks.jsonl"
SHARD_LOG = "shards.jsonl"
SHARD_FILE = re.compile(r"^(train|valid)-\d{6}\.tar$")


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard as the manifest lists it."""

    name: str
    samples: int
    size: int
    sha256: str


def fingerprint(identity: dict) -> str:
    """sha256 of everything that determines the shards' content (inputs, tokenizer, packing)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def _read_json(path: Path) -> Optional[dict]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _read_log(path: Path) -> list[dict]:
    """The complete lines of an append-only JSON-lines log (a torn last line is dropped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


def _append_lines(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def _describe_difference(old: Optional[dict], new: dict) -> str:
    if not old:
        return "shard files without a manifest.json of this tool"
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key == "sources" or old.get(key) == new.get(key):
            continue
        diffs.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    old_sources = {tuple(s) for s in old.get("sources", [])}
    new_sources = {tuple(s) for s in new.get("sources", [])}
    if old_sources != new_sources:
        old_paths, new_paths = {s[0] for s in old_sources}, {s[0] for s in new_sources}
        changed = {s[0] for s in old_sources - new_sources} & new_paths
        diffs.append(
            f"input files: {len(new_paths - old_paths)} added, {len(old_paths - new_paths)} "
            f"removed, {len(changed)} changed"
        )
    return "; ".join(diffs) or "unknown settings"


class ShardWorkspace:
    """Owns OUTPUT for one identity (see module docstring)."""

    def __init__(
        self,
        output: Path,
        identity: dict,
        *,
        overwrite: bool,
        progress: bool = True,
    ):
        if output.exists() and not output.is_dir():
            raise DataError(f"--output {output} is a file; pass a directory")
        self.output = output
        self.staging = output / STAGING
        self.identity = identity
        self.fingerprint = fingerprint(identity)
        self.overwrite = overwrite
        self.progress = progress
        self.valid: dict[str, ShardRecord] = {}
        self._staged: set[str] = set()
        self._claim()

    def _claim(self) -> None:
        """Refuse (or, with overwrite, prepare to replace) another corpus's output or staging."""
        manifest = _read_json(self.output / MANIFEST_NAME)
        stray = [p.name for p in self.output.glob("*.tar") if SHARD_FILE.match(p.name)]
        foreign_output = (manifest or {}).get("fingerprint") != self.fingerprint and (
            manifest is not None or bool(stray)
        )
        state = _read_json(self.staging / STATE)
        foreign_staging = (
            self.staging.exists() and (state or {}).get("fingerprint") != self.fingerprint
        )
        staged = foreign_staging and any(self.staging.glob("*.tar"))
        if (foreign_output or staged) and not self.overwrite:
            where, old = (
                (self.output, (manifest or {}).get("identity"))
                if foreign_output
                else (self.staging, (state or {}).get("identity"))
            )
            raise DataError(
                f"{where} holds shards of another corpus or settings "
                f"({_describe_difference(old, self.identity)}); pass --overwrite to replace "
                "them once the new shards are complete, or choose another --output"
            )
        if foreign_staging:
            shutil.rmtree(self.staging)
        self._output_manifest = manifest if not foreign_output else None

    def _verify(self, records: Iterable[ShardRecord], *, staged: bool) -> None:
        """Add every record whose file (staged or in OUTPUT) has the recorded sha256 to
        ``self.valid``."""
        folder = self.staging if staged else self.output
        present = [
            (folder / r.name, r)
            for r in records
            if (folder / r.name).is_file() and (folder / r.name).stat().st_size == r.size
        ]
        bar = tqdm(
            total=sum(r.size for _, r in present),
            unit="B",
            unit_scale=True,
            desc="verifying existing shards",
            disable=not self.progress or not present,
        )
        for path, record in present:
            if sha256_file(path) == record.sha256:
                self.valid[record.name] = record
                if staged:
                    self._staged.add(record.name)
            bar.update(record.size)
        bar.close()

    def up_to_date(self) -> Optional[dict]:
        """The output's manifest if it was built from the same inputs and settings and every
        shard verifies (an interrupted final swap is completed first); else None."""
        staged_manifest = _read_json(self.staging / MANIFEST_NAME)
        if staged_manifest is not None and staged_manifest.get("fingerprint") == self.fingerprint:
            self._swap_in(staged_manifest)
            self._output_manifest = staged_manifest
        if self._output_manifest is None:
            return None
        records = [
            ShardRecord(**shard)
            for split in self._output_manifest["splits"].values()
            for shard in split["shards"]
        ]
        self._verify(records, staged=False)
        if all(r.name in self.valid for r in records):
            return self._output_manifest
        return None

    def resume(self) -> list[dict]:
        """Verify staged shards and return the chunk log of the unfinished run (may be empty)."""
        state = _read_json(self.staging / STATE)
        if state is None:
            return []
        self._verify((ShardRecord(**r) for r in _read_log(self.staging / SHARD_LOG)), staged=True)
        return _read_log(self.staging / CHUNK_LOG)

    def start(self, chunks: list[dict]) -> None:
        """(Re)open the staging area; keep ``chunks`` as the chunk log's first records."""
        self.staging.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            self.staging / STATE, {"fingerprint": self.fingerprint, "identity": self.identity}
        )
        for path in self.staging.iterdir():
            if path.name not in self._staged and path.suffix in (".tar", ".tmp"):
                path.unlink()
        staged = "".join(
            json.dumps(asdict(self.valid[name])) + "\n" for name in sorted(self._staged)
        )
        write_bytes_atomic(self.staging / SHARD_LOG, staged.encode())
        write_bytes_atomic(
            self.staging / CHUNK_LOG, "".join(json.dumps(c) + "\n" for c in chunks).encode()
        )

    def log_chunks(self, records: list[dict]) -> None:
        _append_lines(self.staging / CHUNK_LOG, records)

    def store_shard(self, record: ShardRecord, data: memoryview) -> None:
        """Stage a finished shard, unless a verified copy with the same sha256 exists."""
        if self.valid.get(record.name) == record:
            return
        write_bytes_atomic(self.staging / record.name, data)
        _append_lines(self.staging / SHARD_LOG, [asdict(record)])
        self.valid[record.name] = record
        self._staged.add(record.name)

    def commit(self, manifest: dict) -> None:
        """Write the manifest and move the staged shards into OUTPUT (see ``_swap_in``)."""
        write_json_atomic(self.staging / MANIFEST_NAME, manifest)
        self._swap_in(manifest)

    def _swap_in(self, manifest: dict) -> None:
        """Move staged shards into place, then the manifest; delete shards no manifest lists."""
        names = {s["name"] for split in manifest["splits"].values() for s in split["shards"]}
        for name in sorted(names):
            if (self.staging / name).is_file():
                os.replace(self.staging / name, self.output / name)
        os.replace(self.staging / MANIFEST_NAME, self.output / MANIFEST_NAME)
        for path in self.output.glob("*.tar"):
            if SHARD_FILE.match(path.name) and path.name not in names:
                path.unlink()
        shutil.rmtree(self.staging)
