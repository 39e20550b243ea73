"""``manifest.json``: what a shard directory holds, and the checks a training run makes against it.

``data_tools/shard.py`` writes the manifest last, after every shard is in place, so a directory
with a manifest is complete. It records the tokenizer (checksum, vocabulary size, special ids),
the packing (seq_length, dtype), and per split the sample, token and source-byte counts and every
shard with its sha256. See docs/data.md for the field list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from vqmoe_megatron.data.errors import DataError
from vqmoe_megatron.data.store import FetchPolicy, ShardStore, open_store

MANIFEST_NAME = "manifest.json"
FORMAT = "vqmoe-token-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "valid")


@dataclass(frozen=True)
class ShardInfo:
    """One tar file: its name in the data directory, sample count, size in bytes and sha256."""

    name: str
    samples: int
    size: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    """One split's token stream.

    ``tokens`` counts the real (non-pad) prediction targets: every document's ids plus its EOS.
    ``bytes`` is the UTF-8 size of the split's document texts, so that bits per byte is
    ``sum(NLL over non-pad targets) / ln(2) / bytes``.
    """

    documents: int
    samples: int
    tokens: int
    bytes: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json``; ``raw`` keeps the whole JSON (sources, settings, versions).
    ``data_dir`` is the location as given (path, URL prefix or pipe: template), ``store`` reads
    its files."""

    data_dir: str
    store: ShardStore
    fingerprint: str
    tokenizer_model: str
    tokenizer_sha256: str
    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int
    unk_id: int
    sep_id: Optional[int]
    seq_length: int
    dtype: str
    samples_per_shard: int
    splits: dict[str, SplitInfo]
    raw: dict

    @property
    def path(self) -> str:
        return self.store.describe(MANIFEST_NAME)

    def split(self, name: str) -> SplitInfo:
        """The named split, or a DataError listing the ones that exist."""
        if name not in self.splits:
            raise DataError(
                f"{self.path} has no split '{name}'; it has {', '.join(sorted(self.splits))}"
            )
        return self.splits[name]


def _field(obj: dict, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where} lacks '{key}'; rebuild it with data_tools/shard.py")
    return obj[key]


def _parse_split(name: str, obj: dict, where: str) -> SplitInfo:
    shards = tuple(
        ShardInfo(
            name=str(_field(s, "name", where)),
            samples=int(_field(s, "samples", where)),
            size=int(_field(s, "size", where)),
            sha256=str(_field(s, "sha256", where)),
        )
        for s in _field(obj, "shards", where)
    )
    split = SplitInfo(
        documents=int(_field(obj, "documents", where)),
        samples=int(_field(obj, "samples", where)),
        tokens=int(_field(obj, "tokens", where)),
        bytes=int(_field(obj, "bytes", where)),
        shards=shards,
    )
    if split.samples != sum(s.samples for s in shards):
        raise DataError(
            f"{where}: split '{name}' claims {split.samples} samples but its shards hold "
            f"{sum(s.samples for s in shards)}; rebuild it with data_tools/shard.py"
        )
    return split


def parse_manifest(store: ShardStore, raw: dict) -> Manifest:
    """Build a Manifest from the JSON object of the store's ``manifest.json``."""
    where = store.describe(MANIFEST_NAME)
    if (
        _field(raw, "format", where) != FORMAT
        or _field(raw, "format_version", where) != FORMAT_VERSION
    ):
        raise DataError(
            f"{where} is format {raw.get('format')!r} version {raw.get('format_version')!r}; this "
            f"code reads {FORMAT!r} version {FORMAT_VERSION}: rebuild it with data_tools/shard.py"
        )
    tok = _field(raw, "tokenizer", where)
    splits = _field(raw, "splits", where)
    return Manifest(
        data_dir=store.location,
        store=store,
        fingerprint=str(_field(raw, "fingerprint", where)),
        tokenizer_model=str(_field(tok, "model", where)),
        tokenizer_sha256=str(_field(tok, "sha256", where)),
        vocab_size=int(_field(tok, "vocab_size", where)),
        pad_id=int(_field(tok, "pad_id", where)),
        eos_id=int(_field(tok, "eos_id", where)),
        bos_id=int(_field(tok, "bos_id", where)),
        unk_id=int(_field(tok, "unk_id", where)),
        sep_id=tok.get("sep_id"),
        seq_length=int(_field(raw, "seq_length", where)),
        dtype=str(_field(raw, "dtype", where)),
        samples_per_shard=int(_field(raw, "samples_per_shard", where)),
        splits={name: _parse_split(name, obj, where) for name, obj in splits.items()},
        raw=raw,
    )


def load_manifest(data_dir: Union[str, Path], fetch: Optional[FetchPolicy] = None) -> Manifest:
    """Read and check ``data_dir/manifest.json`` (a local path, URL prefix or pipe: template;
    ``fetch`` sets the retries of a remote one)."""
    store = open_store(data_dir, fetch)
    path = store.describe(MANIFEST_NAME)
    try:
        with store.open(MANIFEST_NAME) as f:
            raw = json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise DataError(
            f"{path} does not exist: {data_dir} is not a finished shard directory; run "
            "data_tools/shard.py --output DIR (re-running an interrupted run resumes it)"
        ) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path} is not valid JSON ({exc}); rebuild it with data_tools/shard.py"
        ) from exc
    return parse_manifest(store, raw)


def check_manifest_matches(
    manifest: Manifest,
    *,
    vocab_size: int,
    seq_length: int,
    tokenizer_sha256: Optional[str] = None,
) -> None:
    """Refuse to train on data made for another model: every mismatch is named with both values."""
    problems = []
    if manifest.vocab_size != vocab_size:
        problems.append(
            f"vocab_size: the data's tokenizer has {manifest.vocab_size}, the config has "
            f"{vocab_size} (set model.vocab_size={manifest.vocab_size} or re-shard with a "
            "tokenizer of that size)"
        )
    if manifest.seq_length != seq_length:
        problems.append(
            f"seq_length: the data was packed for {manifest.seq_length}, the config has "
            f"{seq_length} (set model.seq_length={manifest.seq_length} or re-shard with "
            f"--seq-length {seq_length})"
        )
    if tokenizer_sha256 is not None and manifest.tokenizer_sha256 != tokenizer_sha256:
        problems.append(
            f"tokenizer sha256: the data was made with {manifest.tokenizer_sha256} "
            f"({manifest.tokenizer_model}), the run expects {tokenizer_sha256} (re-shard with "
            "the run's tokenizer or point the run at the data's tokenizer)"
        )
    if problems:
        raise DataError(
            f"{manifest.path} does not match the training config: " + "; ".join(problems)
        )
