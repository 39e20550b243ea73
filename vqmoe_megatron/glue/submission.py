"""Test-set predictions in the format the GLUE server takes, and reading them back.

One file per test split, named as the server expects (CoLA.tsv, SST-2.tsv, MRPC.tsv, STS-B.tsv,
QQP.tsv, MNLI-m.tsv, MNLI-mm.tsv, QNLI.tsv, RTE.tsv, WNLI.tsv), with the header
``index<TAB>prediction`` and one row per test example, indexed by the test file's index column.
Predictions are label names for MNLI, QNLI and RTE (``entailment``, ...), 0/1 for the other
classification tasks, and for STS-B a score clipped to [0, 5].
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np

from vqmoe_megatron.glue.metrics import ArrayLike, check_predictions
from vqmoe_megatron.glue.tasks import GlueDataError, GlueSplit, GlueTask, get_task, parse_label
from vqmoe_megatron.glue.tsv import read_tsv, write_tsv

LOGGER = logging.getLogger(__name__)

HEADER = ("index", "prediction")


def format_predictions(task: Union[str, GlueTask], predictions: ArrayLike) -> list[str]:
    """Class ids as the task's label names, STS-B scores clipped to its range (6 decimals)."""
    task = get_task(task)
    values = check_predictions(task, predictions)
    if task.labels is None:
        low, high = task.label_range or (-np.inf, np.inf)
        return [f"{score:.6f}" for score in np.clip(values, low, high)]
    return [task.labels[class_id] for class_id in values]


def write_predictions(
    path: Union[str, Path],
    task: Union[str, GlueTask],
    indices: Sequence[str],
    predictions: ArrayLike,
) -> Path:
    """Write ``index<TAB>prediction`` rows to ``path`` (atomically) and return it."""
    formatted = format_predictions(task, predictions)
    if len(formatted) != len(indices):
        raise ValueError(f"{len(indices)} indices but {len(formatted)} predictions")
    path = Path(path)
    write_tsv(path, HEADER, zip(indices, formatted))
    return path


def write_submission(split: GlueSplit, predictions: ArrayLike, out_dir: Union[str, Path]) -> Path:
    """Write the GLUE submission file for a test split read by ``read_split``; return its path."""
    if not split.spec.is_test:
        tests = ", ".join(split.task.test_splits)
        raise ValueError(
            f"GLUE takes predictions for test splits only ({split.task.name}: {tests}), "
            f"not for {split.spec.name}"
        )
    if split.malformed_lines:
        LOGGER.warning(
            "%s: %d malformed rows were skipped, so %s has no prediction for them; the GLUE "
            "server expects one per test row",
            split.path,
            len(split.malformed_lines),
            split.spec.submission,
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = [example.guid for example in split.examples]
    return write_predictions(out_dir / split.spec.submission, split.task, indices, predictions)


def read_predictions(
    path: Union[str, Path], task: Union[str, GlueTask]
) -> tuple[list[str], np.ndarray]:
    """Read a file written by ``write_predictions``: its indices, and class ids or scores."""
    task = get_task(task)
    path = Path(path)
    if not path.is_file():
        raise GlueDataError(f"prediction file {path} does not exist")
    rows = read_tsv(path)
    first = next(rows, None)
    if first is None or tuple(first[1]) != HEADER:
        raise GlueDataError(f"{path}: expected the header {'<TAB>'.join(HEADER)}")
    indices: list[str] = []
    values: list[int | float] = []
    for line, fields in rows:
        if len(fields) != len(HEADER):
            raise GlueDataError(f"{path} line {line}: expected 2 columns (index, prediction)")
        indices.append(fields[0])
        values.append(parse_label(task, fields[1], f"{path} line {line}, column 'prediction'"))
    dtype = np.float64 if task.labels is None else np.int64
    return indices, np.asarray(values, dtype=dtype)
