"""Tokenize text into WebDataset shards for pretraining: ``python data_tools/shard.py --help``.

Writes OUTPUT/{train,valid}-NNNNNN.tar and OUTPUT/manifest.json. Each split is one token
stream (EOS, then every document followed by EOS) cut into samples of seq_length + 1 ids that
overlap by one token; the last sample is padded with the tokenizer's pad id. Documents go to
train or valid by a seeded hash of their text. Re-running the same command verifies and skips
finished work, and continues an interrupted run.

On many machines (slurm/shard_corpus.sh does this as an array job): run the same command with
``--part I --parts N`` for every I in 0..N-1 (each tokenizes a contiguous run of the input files
into OUTPUT/.parts/), then once with ``--merge --parts N``, which checks every part and writes the
shards and manifest.json, byte-identical to the single-machine run.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.remove(str(Path(__file__).resolve().parent))

from vqmoe_megatron.interrupt import guard_startup

if __name__ == "__main__":
    guard_startup()  # Ctrl-C during the imports below: one line, exit 130

from collections.abc import Sequence
from typing import Optional

from vqmoe_megatron.data.cli import (
    available_cpus,
    print_replacements,
    run_cli,
    text_tool_parser,
)
from vqmoe_megatron.data.shard_parts import check_mode, merge_parts, write_part
from vqmoe_megatron.data.sharding import ShardSettings, build_shards

MODE_OPTIONS = ("part", "parts", "merge")


def parse_args(argv: Optional[Sequence[str]]) -> tuple[ShardSettings, bool, dict]:
    defaults = ShardSettings(inputs=[], tokenizer="", output="", seq_length=0)
    p = text_tool_parser(__doc__)
    p.add_argument(
        "--tokenizer", required=True, help="sentencepiece .model from train_tokenizer.py"
    )
    p.add_argument("--output", required=True, help="directory for the shards and manifest.json")
    p.add_argument(
        "--seq-length",
        type=int,
        required=True,
        help="model.seq_length of the runs that will read the shards",
    )
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=defaults.valid_fraction,
        help="fraction of documents (by hash) that go to the valid split",
    )
    p.add_argument(
        "--split-seed",
        type=int,
        default=defaults.split_seed,
        help="seed of the train/valid document hash",
    )
    p.add_argument(
        "--shard-size-mb",
        type=float,
        default=defaults.shard_size_mb,
        help="target size of one shard in MiB",
    )
    p.add_argument("--workers", type=int, default=available_cpus(), help="tokenizer processes")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace shards of another corpus in OUTPUT (only once the new set is complete)",
    )
    p.add_argument(
        "--part", type=int, help="tokenize only part I (0-based) of --parts into OUTPUT/.parts"
    )
    p.add_argument("--parts", type=int, help="number of parts of a split run (--part or --merge)")
    p.add_argument(
        "--merge", action="store_true", help="check all --parts parts, write shards and manifest"
    )
    args = vars(p.parse_args(argv))
    mode = {name: args.pop(name) for name in MODE_OPTIONS}
    quiet = args.pop("quiet")
    return ShardSettings(**args), quiet, mode


def main(argv: Optional[Sequence[str]] = None) -> None:
    settings, quiet, mode = parse_args(argv)
    check_mode(**mode)
    if mode["part"] is not None:
        write_part(settings, mode["part"], mode["parts"], progress=not quiet)
        return
    if mode["merge"]:
        manifest = merge_parts(settings, mode["parts"], progress=not quiet)
    else:
        manifest = build_shards(settings, progress=not quiet)
    for name, split in manifest["splits"].items():
        print(
            f"{name}: {split['documents']} documents, {split['tokens']:,} tokens, "
            f"{split['bytes']:,} bytes, {split['samples']} samples in {len(split['shards'])} shards"
        )
    print_replacements(manifest["sources"])
    skipped = sum(s["empty_documents"] for s in manifest["sources"])
    if skipped:
        print(f"skipped {skipped} empty documents")
    print(f"manifest: {Path(settings.output) / 'manifest.json'}")


if __name__ == "__main__":
    run_cli(main)
