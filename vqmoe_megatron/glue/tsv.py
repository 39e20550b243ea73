"""The tab-separated dialect of the GLUE files, and the one error type for bad GLUE input.

GLUE's TSVs are not CSV: sentences hold unbalanced double quotes (``" the witness "`` split over
a pair, a lone ``"`` in MNLI), so they are read with ``csv.QUOTE_NONE`` and one line is one row.
Files are read as UTF-8 with an optional byte-order mark (GLUE copies the BOM of the MSR
paraphrase files into ``MRPC/train.tsv`` and ``dev.tsv``). Written files use the same dialect;
a field that would need quoting (a tab or a line break) is refused instead.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path


class GlueDataError(ValueError):
    """GLUE input that cannot be used: the message names the file and what was expected."""


def read_tsv(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line_number, fields)`` for every line of ``path`` (1-based, header included)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            for fields in reader:
                yield reader.line_num, fields
    except UnicodeDecodeError as exc:
        raise GlueDataError(f"{path} is not UTF-8 text ({exc})") from exc
    except csv.Error as exc:
        raise GlueDataError(f"{path} line {reader.line_num}: unreadable TSV ({exc})") from exc


def write_tsv(path: Path, header: Sequence[str], rows: Iterable[Sequence[str]]) -> int:
    """Write a header and rows to ``path`` atomically (``<name>.tmp``, then rename); return rows.

    A field containing a tab or a line break would split the row when read back with
    QUOTE_NONE, so it raises GlueDataError instead of writing a file that reads differently.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            for fields in itertools.chain([header], rows):
                bad = [field for field in fields if any(ch in field for ch in "\t\r\n")]
                if bad:
                    raise GlueDataError(
                        f"{path}: field {bad[0]!r} contains a tab or a line break, which a GLUE "
                        "TSV cannot hold"
                    )
                handle.write("\t".join(fields) + "\n")
                count += 1
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count - 1
