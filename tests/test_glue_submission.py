"""GLUE submission files: names, header, label format, and the round trip through the reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vqmoe_megatron.glue.submission import read_predictions, write_predictions, write_submission
from vqmoe_megatron.glue.tasks import TASKS, GlueDataError, read_split

FIXTURES = Path(__file__).parent / "fixtures" / "glue"

TEST_SPLITS = [(t.name, s.name) for t in TASKS.values() for s in t.splits if s.is_test]

# The first two rows each task's fixture submission must hold, as the GLUE server reads them.
EXPECTED_ROWS = {
    "CoLA.tsv": ["0\t0", "1\t1"],
    "SST-2.tsv": ["0\t0", "1\t1"],
    "MRPC.tsv": ["0\t0", "1\t1"],
    "STS-B.tsv": ["0\t0.000000", "1\t5.000000"],
    "QQP.tsv": ["0\t0", "1\t1"],
    "MNLI-m.tsv": ["0\tcontradiction", "1\tentailment"],
    "MNLI-mm.tsv": ["0\tcontradiction", "1\tentailment"],
    "QNLI.tsv": ["0\tentailment", "1\tnot_entailment"],
    "RTE.tsv": ["0\tentailment", "1\tnot_entailment"],
    "WNLI.tsv": ["0\t0", "1\t1"],
}


def _predictions(task_name: str, count: int) -> np.ndarray:
    task = TASKS[task_name]
    if task.is_regression:
        return np.linspace(-1.0, 7.0, count)  # out of range at both ends: clipped to [0, 5]
    return np.arange(count) % task.num_labels


@pytest.mark.parametrize("task,split", TEST_SPLITS)
def test_submission_round_trip(tmp_path, task, split):
    test = read_split(FIXTURES, task, split)
    predictions = _predictions(task, len(test.examples))
    path = write_submission(test, predictions, tmp_path / "submission")
    assert path.name == test.spec.submission
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "index\tprediction"
    assert lines[1:3] == EXPECTED_ROWS[path.name]
    assert len(lines) == len(test.examples) + 1
    indices, values = read_predictions(path, task)
    assert indices == [example.guid for example in test.examples]
    if TASKS[task].is_regression:
        np.testing.assert_allclose(values, np.clip(predictions, 0.0, 5.0), atol=1e-6)
    else:
        assert values.tolist() == predictions.tolist()


def test_submission_file_names_cover_the_glue_server_set(tmp_path):
    for task, split in TEST_SPLITS:
        test = read_split(FIXTURES, task, split)
        write_submission(test, _predictions(task, len(test.examples)), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(EXPECTED_ROWS)


def test_submission_only_for_test_splits(tmp_path):
    dev = read_split(FIXTURES, "RTE", "dev")
    with pytest.raises(ValueError, match="test splits only"):
        write_submission(dev, [0, 1], tmp_path)


def test_prediction_count_must_match(tmp_path):
    test = read_split(FIXTURES, "WNLI", "test")
    with pytest.raises(ValueError, match="2 indices but 3 predictions"):
        write_submission(test, [0, 1, 1], tmp_path)
    assert not any(tmp_path.iterdir())


def test_reading_an_unknown_prediction_names_line_and_labels(tmp_path):
    path = tmp_path / "QNLI.tsv"
    path.write_text("index\tprediction\n0\tentailment\n1\tneutral\n", encoding="utf-8")
    with pytest.raises(GlueDataError, match=r"line 3, column 'prediction': unknown QNLI label"):
        read_predictions(path, "QNLI")


def test_reading_a_file_without_the_header(tmp_path):
    path = write_predictions(tmp_path / "x.tsv", "SST-2", ["0"], [1])
    path.write_text(path.read_text().replace("prediction", "label"), encoding="utf-8")
    with pytest.raises(GlueDataError, match="expected the header"):
        read_predictions(path, "SST-2")


def test_a_field_that_would_split_the_row_is_refused(tmp_path):
    with pytest.raises(GlueDataError, match="contains a tab or a line break"):
        write_predictions(tmp_path / "SST-2.tsv", "SST-2", ["0\t1"], [1])
    assert not any(tmp_path.iterdir())


def test_skipped_qqp_test_rows_are_reported(tmp_path, caplog):
    qqp = tmp_path / "glue" / "QQP"
    qqp.mkdir(parents=True)
    (qqp / "test.tsv").write_text(
        "id\tquestion1\tquestion2\n0\tWhy?\tHow?\n1\tbroken row\n", encoding="utf-8"
    )
    test = read_split(tmp_path / "glue", "QQP", "test")
    assert test.malformed_lines == (3,)
    write_submission(test, [1], tmp_path / "out")
    assert "1 malformed rows were skipped, so QQP.tsv has no prediction for them" in caplog.text
