"""Summarise a shard directory and decode samples: ``python data_tools/inspect.py --help``.

Prints the manifest (tokenizer, packing, per-split counts, sources); ``--sample N`` decodes
sample N of ``--split`` back to text (document ends shown as [EOS], padding dropped);
``--verify`` reads every shard and checks its samples and sha256.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.remove(str(Path(__file__).resolve().parent))

from vqmoe_megatron.interrupt import guard_startup

if __name__ == "__main__":
    guard_startup()  # Ctrl-C during the imports below: one line, exit 130

import argparse
from collections.abc import Sequence
from typing import Optional

import numpy as np
from tqdm import tqdm

from vqmoe_megatron.data import DataError, Manifest, Tokenizer, load_manifest
from vqmoe_megatron.data.cli import run_cli
from vqmoe_megatron.data.shard_format import iter_shard


def summary(manifest: Manifest) -> str:
    """Human-readable overview of a manifest."""
    raw = manifest.raw
    lines = [
        f"data: {manifest.data_dir} (created {raw.get('created', '?')})",
        f"tokenizer: {manifest.tokenizer_model} (sha256 {manifest.tokenizer_sha256[:16]}..., "
        f"{manifest.vocab_size} pieces; pad {manifest.pad_id}, eos {manifest.eos_id}, "
        f"bos {manifest.bos_id}, sep {manifest.sep_id})",
        f"packing: samples of seq_length + 1 = {manifest.seq_length + 1} {manifest.dtype} ids, "
        f"{manifest.samples_per_shard} samples per shard; {raw.get('packing', '')}",
        f"{'split':<6} {'documents':>10} {'tokens':>14} {'bytes':>14} {'bytes/token':>11} "
        f"{'samples':>10} {'shards':>7} {'MiB':>9}",
    ]
    for name, split in manifest.splits.items():
        ratio = f"{split.bytes / split.tokens:.3f}" if split.tokens else "-"
        size = sum(s.size for s in split.shards) / 2**20
        lines.append(
            f"{name:<6} {split.documents:>10,} {split.tokens:>14,} {split.bytes:>14,} {ratio:>11} "
            f"{split.samples:>10,} {len(split.shards):>7} {size:>9.1f}"
        )
    sources = raw.get("sources", [])
    lines.append(
        f"sources: {len(sources)} files, {sum(s['size'] for s in sources):,} bytes; "
        f"{sum(s['empty_documents'] for s in sources)} empty documents skipped, "
        f"{sum(s['replaced_characters'] for s in sources)} invalid UTF-8 sequences replaced"
    )
    return "\n".join(lines)


def _read(manifest: Manifest, shard_index: int, split: str, sha256: Optional[str]):
    shards = manifest.split(split).shards
    first = sum(s.samples for s in shards[:shard_index])
    shard = shards[shard_index]
    return iter_shard(
        manifest.store,
        shard.name,
        first_index=first,
        samples=shard.samples,
        sample_length=manifest.seq_length + 1,
        dtype=manifest.dtype,
        vocab_size=manifest.vocab_size,
        sha256=sha256,
    )


def read_sample(manifest: Manifest, split: str, index: int) -> np.ndarray:
    """Sample ``index`` of ``split`` [seq_length + 1]."""
    shards = manifest.split(split).shards
    total = manifest.split(split).samples
    if not 0 <= index < total:
        raise DataError(f"--sample {index} is out of range: split '{split}' has {total} samples")
    shard_index = index // manifest.samples_per_shard
    for found, array in _read(manifest, shard_index, split, None):
        if found == index:
            return array
    raise DataError(f"sample {index} not found in {shards[shard_index].name}")


def render(tokenizer: Tokenizer, ids: np.ndarray) -> str:
    """Text of a sample with document ends marked [EOS] (pad ids dropped)."""
    pieces = np.split(ids, np.flatnonzero(ids == tokenizer.eos_id))
    text = [tokenizer.decode(pieces[0])] + [tokenizer.decode(p[1:]) for p in pieces[1:]]
    return "[EOS]".join(text)


def verify(manifest: Manifest) -> int:
    """Read every shard of every split, checking samples and sha256; the number of shards."""
    checked = 0
    shards = [
        (split, i) for split, info in manifest.splits.items() for i in range(len(info.shards))
    ]
    for split, i in tqdm(shards, desc="verifying", unit="shard"):
        for _ in _read(manifest, i, split, manifest.split(split).shards[i].sha256):
            pass
        checked += 1
    return checked


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "data_dir", help="output of data_tools/shard.py: path, http(s):// prefix or pipe: template"
    )
    p.add_argument("--split", default="train", help="split of --sample")
    p.add_argument(
        "--sample",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="decode sample N (repeatable)",
    )
    p.add_argument("--tokenizer", help="tokenizer .model (default: the one in the manifest)")
    p.add_argument("--verify", action="store_true", help="check every shard's samples and sha256")
    args = p.parse_args(argv)
    manifest = load_manifest(args.data_dir)
    print(summary(manifest))
    if args.verify:
        print(f"verified {verify(manifest)} shards: samples and sha256 match manifest.json")
    if args.sample:
        tokenizer = Tokenizer(args.tokenizer or manifest.tokenizer_model)
        if tokenizer.sha256 != manifest.tokenizer_sha256:
            raise DataError(
                f"tokenizer {tokenizer.path} has sha256 {tokenizer.sha256}, but the data was made "
                f"with {manifest.tokenizer_sha256}; pass the data's tokenizer with --tokenizer"
            )
        for index in args.sample:
            ids = read_sample(manifest, args.split, index)
            pads = int((ids == manifest.pad_id).sum())
            print(f"\n--- {args.split} sample {index}: {len(ids)} ids, {pads} pad ---")
            print(render(tokenizer, ids))


if __name__ == "__main__":
    run_cli(main)
