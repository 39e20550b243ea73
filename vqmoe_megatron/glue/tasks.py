"""The nine GLUE tasks declared as data, and one reader for every split of every task.

The files are read as GLUE's own download script (``download_glue_data.py``) lays them out::

    <glue_dir>/CoLA/{train,dev,test}.tsv        SST-2, MRPC, STS-B, QQP, QNLI, RTE, WNLI alike
    <glue_dir>/MNLI/{train,dev_matched,dev_mismatched,test_matched,test_mismatched}.tsv

Each GlueTask names the columns of each of its files exactly as GLUE writes them (the header
must match; CoLA's train and dev files are the only ones without a header), the columns that
hold the text (one sentence or a pair), the label column with its label set (None for the
STS-B regression), and the metrics GLUE reports for it. Rows of the wrong width are errors,
except in QQP, where some rows of GLUE's release are malformed (fields missing, or a question
broken over two lines): those are skipped, counted in ``GlueSplit.malformed_lines`` and logged.
"""

from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from vqmoe_megatron.glue.tsv import GlueDataError, read_tsv

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlueExample:
    """One example of a GLUE split.

    ``guid``: for test splits the value of the file's index column (what the GLUE server
    matches predictions on); for train and dev splits ``"<split>-<n>"``, n counting from 0.
    ``label``: the class id (position in ``GlueTask.labels``), the float score for STS-B, or
    None for test splits, which GLUE distributes without labels.
    """

    guid: str
    text_a: str
    text_b: str | None
    label: int | float | None


@dataclass(frozen=True)
class SplitSpec:
    """One file of a task: ``<name>.tsv`` with exactly these columns."""

    name: str
    columns: tuple[str, ...]
    has_header: bool = True
    """False only for CoLA's train and dev files; ``columns`` then just names the positions."""
    submission: str | None = None
    """Test splits: the file name the GLUE server expects predictions for this split under."""

    @property
    def file(self) -> str:
        return f"{self.name}.tsv"

    @property
    def is_test(self) -> bool:
        return self.submission is not None


@dataclass(frozen=True)
class GlueTask:
    """Everything that differs between GLUE tasks, so that one reader serves all nine."""

    name: str
    """GLUE's name for the task, which is also the name of its folder."""
    splits: tuple[SplitSpec, ...]
    text_a: str
    text_b: str | None
    """Column of the second sentence; None for single-sentence tasks (CoLA, SST-2)."""
    labels: tuple[str, ...] | None
    """Label values as written in the files; a label's class id is its position. None: regression."""
    label_column: str = "label"
    metrics: tuple[str, ...] = ("accuracy",)
    """Names of the metrics GLUE reports (see ``vqmoe_megatron.glue.metrics``)."""
    main_metric: str = "accuracy"
    """The number used to pick the best checkpoint: GLUE's score for the task ('combined' is the
    mean of two metrics). MNLI picks on its first dev split, dev_matched."""
    index_column: str = "index"
    label_range: tuple[float, float] | None = None
    """Regression only: the valid score range (STS-B: 0 to 5)."""
    skip_malformed: bool = False
    """Skip and count rows of the wrong width instead of refusing the file (QQP)."""

    @property
    def directory(self) -> str:
        """The task's folder under the GLUE data directory."""
        return self.name

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        """Width of the classification head: one output for a regression task."""
        return 1 if self.labels is None else len(self.labels)

    @property
    def dev_splits(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.splits if not s.is_test and s.name != "train")

    @property
    def test_splits(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.splits if s.is_test)

    def split(self, name: str) -> SplitSpec:
        """The spec of split ``name``; GlueDataError listing the task's splits otherwise."""
        for spec in self.splits:
            if spec.name == name:
                return spec
        valid = ", ".join(s.name for s in self.splits)
        raise GlueDataError(f"GLUE task {self.name} has no split {name!r}; its splits: {valid}")


@dataclass
class GlueSplit:
    """The examples of one file, with the line numbers of the rows skipped as malformed."""

    task: GlueTask
    spec: SplitSpec
    path: Path
    examples: list[GlueExample]
    malformed_lines: tuple[int, ...] = ()


def _train_dev_test(
    task: str, labelled: tuple[str, ...], test: tuple[str, ...], labelled_header: bool = True
) -> tuple[SplitSpec, ...]:
    """The usual three files; predictions for test.tsv go to ``<task>.tsv``."""
    return (
        SplitSpec("train", labelled, labelled_header),
        SplitSpec("dev", labelled, labelled_header),
        SplitSpec("test", test, submission=f"{task}.tsv"),
    )


_BINARY = ("0", "1")
_ENTAILMENT = ("entailment", "not_entailment")
_PAIR_TEST = ("index", "sentence1", "sentence2")
_MRPC_TEXT = ("#1 ID", "#2 ID", "#1 String", "#2 String")
_QQP_TEST = ("id", "question1", "question2")
_QNLI_TEST = ("index", "question", "sentence")
_STSB_TEST = (
    "index",
    "genre",
    "filename",
    "year",
    "old_index",
    "source1",
    "source2",
    "sentence1",
    "sentence2",
)
_MNLI_TEST = (
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
)
_MNLI_DEV = _MNLI_TEST + ("label1", "label2", "label3", "label4", "label5", "gold_label")

TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(
            name="CoLA",
            splits=_train_dev_test(
                "CoLA",
                ("source", "label", "original_judgement", "sentence"),
                ("index", "sentence"),
                labelled_header=False,
            ),
            text_a="sentence",
            text_b=None,
            labels=_BINARY,
            metrics=("mcc",),
            main_metric="mcc",
        ),
        GlueTask(
            name="SST-2",
            splits=_train_dev_test("SST-2", ("sentence", "label"), ("index", "sentence")),
            text_a="sentence",
            text_b=None,
            labels=_BINARY,
        ),
        GlueTask(
            name="MRPC",
            splits=_train_dev_test("MRPC", ("Quality",) + _MRPC_TEXT, ("index",) + _MRPC_TEXT),
            text_a="#1 String",
            text_b="#2 String",
            labels=_BINARY,
            label_column="Quality",
            metrics=("f1", "accuracy"),
            main_metric="combined",
        ),
        GlueTask(
            name="STS-B",
            splits=_train_dev_test("STS-B", _STSB_TEST + ("score",), _STSB_TEST),
            text_a="sentence1",
            text_b="sentence2",
            labels=None,
            label_column="score",
            metrics=("pearson", "spearmanr"),
            main_metric="combined",
            label_range=(0.0, 5.0),
        ),
        GlueTask(
            name="QQP",
            splits=_train_dev_test(
                "QQP", ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"), _QQP_TEST
            ),
            text_a="question1",
            text_b="question2",
            labels=_BINARY,
            label_column="is_duplicate",
            metrics=("f1", "accuracy"),
            main_metric="combined",
            index_column="id",
            skip_malformed=True,
        ),
        GlueTask(
            name="MNLI",
            splits=(
                SplitSpec("train", _MNLI_TEST + ("label1", "gold_label")),
                SplitSpec("dev_matched", _MNLI_DEV),
                SplitSpec("dev_mismatched", _MNLI_DEV),
                SplitSpec("test_matched", _MNLI_TEST, submission="MNLI-m.tsv"),
                SplitSpec("test_mismatched", _MNLI_TEST, submission="MNLI-mm.tsv"),
            ),
            text_a="sentence1",
            text_b="sentence2",
            labels=("contradiction", "entailment", "neutral"),
            label_column="gold_label",
        ),
        GlueTask(
            name="QNLI",
            splits=_train_dev_test("QNLI", _QNLI_TEST + ("label",), _QNLI_TEST),
            text_a="question",
            text_b="sentence",
            labels=_ENTAILMENT,
        ),
        GlueTask(
            name="RTE",
            splits=_train_dev_test("RTE", _PAIR_TEST + ("label",), _PAIR_TEST),
            text_a="sentence1",
            text_b="sentence2",
            labels=_ENTAILMENT,
        ),
        GlueTask(
            name="WNLI",
            splits=_train_dev_test("WNLI", _PAIR_TEST + ("label",), _PAIR_TEST),
            text_a="sentence1",
            text_b="sentence2",
            labels=_BINARY,
        ),
    )
}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def get_task(task: Union[str, GlueTask]) -> GlueTask:
    """Look a task up by GLUE's name, case and '-'/'_' ignored ('SST-2', 'sst2', 'sts_b')."""
    if isinstance(task, GlueTask):
        return task
    by_key = {_key(name): spec for name, spec in TASKS.items()}
    if _key(task) in by_key:
        return by_key[_key(task)]
    close = difflib.get_close_matches(_key(task), list(by_key), n=1, cutoff=0.6)
    hint = f"; did you mean {by_key[close[0]].name}?" if close else ""
    raise GlueDataError(f"unknown GLUE task {task!r}; valid tasks: {', '.join(TASKS)}{hint}")


def _missing_message(data_dir: Path, task: GlueTask, missing: list[Path]) -> str:
    folder = data_dir / task.directory
    what = f"folder {folder}" if not folder.is_dir() else ", ".join(str(p) for p in missing)
    message = (
        f"GLUE task {task.name}: {what} does not exist. {task.name} needs "
        f"{', '.join(s.file for s in task.splits)} in <glue_dir>/{task.directory}/, the layout "
        f"GLUE's download_glue_data.py writes (data_dir given: {data_dir})"
    )
    if data_dir.name == task.directory:
        message += (
            f"; data_dir must be the folder that contains {task.directory}/, not the task folder"
        )
    return message


def check_task_files(data_dir: Union[str, Path], task: Union[str, GlueTask]) -> dict[str, Path]:
    """Paths of all files of ``task`` by split; one GlueDataError naming every missing file.

    Call it before training so that a missing test file is found before the run, not after.
    """
    task = get_task(task)
    data_dir = Path(data_dir)
    paths = {s.name: data_dir / task.directory / s.file for s in task.splits}
    missing = [path for path in paths.values() if not path.is_file()]
    if missing:
        raise GlueDataError(_missing_message(data_dir, task, missing))
    return paths


def _columns_note(spec: SplitSpec) -> str:
    note = f"{len(spec.columns)} tab-separated columns ({', '.join(spec.columns)})"
    return note if spec.has_header else note + " and no header line"


def _check_header(path: Path, task: GlueTask, spec: SplitSpec, header: list[str] | None) -> None:
    if header is None:
        raise GlueDataError(
            f"{path} is empty; GLUE's {task.name} {spec.file} has {_columns_note(spec)}"
        )
    if tuple(header) == spec.columns:
        return
    message = (
        f"{path}: header is {header} but GLUE's {task.name} {spec.file} has {_columns_note(spec)}"
    )
    same = [
        other.file for other in task.splits if other.has_header and other.columns == tuple(header)
    ]
    if same:
        message += f" (these are the columns of {task.name}'s {same[0]})"
    raise GlueDataError(message)


def parse_label(task: GlueTask, raw: str, where: str) -> int | float:
    """A label as written in a file -> class id, or float score for STS-B.

    ``where`` ("<file> line <n>, column '<name>'") starts the message of the GlueDataError
    raised for an unknown label or a score out of range.
    """
    if task.labels is not None:
        if raw not in task.labels:
            raise GlueDataError(
                f"{where}: unknown {task.name} label {raw!r}; allowed: {list(task.labels)}"
            )
        return task.labels.index(raw)
    low, high = task.label_range or (-math.inf, math.inf)
    try:
        score = float(raw)
    except ValueError:
        score = math.nan
    if not low <= score <= high:
        raise GlueDataError(
            f"{where}: {task.name} score {raw!r} is not a number from {low:g} to {high:g}"
        )
    return score


def read_split(data_dir: Union[str, Path], task: Union[str, GlueTask], split: str) -> GlueSplit:
    """Read ``<data_dir>/<task>/<split>.tsv`` into GlueExamples, checking columns and labels."""
    task = get_task(task)
    spec = task.split(split)
    data_dir = Path(data_dir)
    path = data_dir / task.directory / spec.file
    if not path.is_file():
        raise GlueDataError(_missing_message(data_dir, task, [path]))
    rows = read_tsv(path)
    if spec.has_header:
        first = next(rows, None)
        _check_header(path, task, spec, None if first is None else first[1])
    elif path.stat().st_size == 0:
        _check_header(path, task, spec, None)
    position = {column: i for i, column in enumerate(spec.columns)}
    examples: list[GlueExample] = []
    malformed: list[int] = []
    for line, fields in rows:
        if len(fields) != len(spec.columns):
            if task.skip_malformed:
                malformed.append(line)
                continue
            raise GlueDataError(
                f"{path} line {line}: found {len(fields)} columns; GLUE's {task.name} "
                f"{spec.file} has {_columns_note(spec)}"
            )
        if spec.is_test:
            guid, label = fields[position[task.index_column]], None
        else:
            guid = f"{spec.name}-{len(examples)}"
            where = f"{path} line {line}, column '{task.label_column}'"
            label = parse_label(task, fields[position[task.label_column]], where)
        text_b = None if task.text_b is None else fields[position[task.text_b]]
        examples.append(GlueExample(guid, fields[position[task.text_a]], text_b, label))
    if malformed:
        LOGGER.warning(
            "%s: skipped %d malformed rows of the wrong width (expected %d columns) at lines %s",
            path,
            len(malformed),
            len(spec.columns),
            ", ".join(map(str, malformed[:10])) + (", ..." if len(malformed) > 10 else ""),
        )
    return GlueSplit(task, spec, path, examples, tuple(malformed))
