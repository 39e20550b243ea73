"""Bad GLUE input: each case raises one GlueDataError that names the file and what was expected."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vqmoe_megatron.glue.tasks import GlueDataError, check_task_files, read_split

FIXTURES = Path(__file__).parent / "fixtures" / "glue"


@pytest.fixture
def glue_dir(tmp_path: Path) -> Path:
    """A writable copy of the fixture GLUE folder."""
    return Path(shutil.copytree(FIXTURES, tmp_path / "glue"))


def _replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[number - 1] = text + "\n"
    path.write_text("".join(lines), encoding="utf-8")


def _message(glue_dir: Path, task: str, split: str) -> str:
    with pytest.raises(GlueDataError) as err:
        read_split(glue_dir, task, split)
    assert isinstance(err.value, ValueError)
    return str(err.value)


def test_missing_task_folder_says_what_the_task_needs(glue_dir):
    shutil.rmtree(glue_dir / "RTE")
    message = _message(glue_dir, "RTE", "train")
    assert f"folder {glue_dir / 'RTE'} does not exist" in message
    assert "train.tsv, dev.tsv, test.tsv in <glue_dir>/RTE/" in message
    assert "download_glue_data.py" in message


def test_missing_file_is_named_with_all_files_of_the_task(glue_dir):
    (glue_dir / "MNLI" / "dev_mismatched.tsv").unlink()
    (glue_dir / "MNLI" / "test_matched.tsv").unlink()
    with pytest.raises(GlueDataError) as err:
        check_task_files(glue_dir, "MNLI")
    message = str(err.value)
    assert str(glue_dir / "MNLI" / "dev_mismatched.tsv") in message
    assert str(glue_dir / "MNLI" / "test_matched.tsv") in message
    expected = (
        "train.tsv, dev_matched.tsv, dev_mismatched.tsv, test_matched.tsv, test_mismatched.tsv"
    )
    assert expected in message
    assert str(glue_dir / "MNLI" / "dev_mismatched.tsv") in _message(
        glue_dir, "MNLI", "dev_mismatched"
    )


def test_task_folder_given_as_data_dir_gets_a_hint(glue_dir):
    message = _message(glue_dir / "SST-2", "SST-2", "train")
    assert "data_dir must be the folder that contains SST-2/" in message


def test_wrong_header_names_the_expected_columns(glue_dir):
    shutil.copy(glue_dir / "SST-2" / "test.tsv", glue_dir / "SST-2" / "dev.tsv")
    message = _message(glue_dir, "SST-2", "dev")
    assert str(glue_dir / "SST-2" / "dev.tsv") in message
    assert "header is ['index', 'sentence']" in message
    assert "2 tab-separated columns (sentence, label)" in message
    assert "these are the columns of SST-2's test.tsv" in message


def test_row_of_the_wrong_width_names_line_and_columns(glue_dir):
    _replace_line(glue_dir / "RTE" / "train.tsv", 3, "1\tThe museum opened in 1990.\tentailment")
    message = _message(glue_dir, "RTE", "train")
    assert f"{glue_dir / 'RTE' / 'train.tsv'} line 3: found 3 columns" in message
    assert "4 tab-separated columns (index, sentence1, sentence2, label)" in message


def test_cola_with_a_header_line_is_refused_as_an_unknown_label(glue_dir):
    path = glue_dir / "CoLA" / "train.tsv"
    path.write_text("source\tlabel\tjudgement\tsentence\n" + path.read_text(), encoding="utf-8")
    message = _message(glue_dir, "CoLA", "train")
    assert f"{path} line 1, column 'label': unknown CoLA label 'label'" in message
    assert "allowed: ['0', '1']" in message


def test_unknown_label_names_label_line_and_allowed_set(glue_dir):
    path = glue_dir / "MNLI" / "dev_matched.tsv"
    lines = path.read_text(encoding="utf-8").splitlines()
    _replace_line(path, 3, lines[2].rsplit("\t", 1)[0] + "\t-")
    message = _message(glue_dir, "MNLI", "dev_matched")
    assert f"{path} line 3, column 'gold_label': unknown MNLI label '-'" in message
    assert "allowed: ['contradiction', 'entailment', 'neutral']" in message


@pytest.mark.parametrize("score", ["5.5", "-0.1", "n/a", "nan", ""])
def test_stsb_score_must_be_a_number_from_0_to_5(glue_dir, score):
    path = glue_dir / "STS-B" / "dev.tsv"
    lines = path.read_text(encoding="utf-8").splitlines()
    _replace_line(path, 2, lines[1].rsplit("\t", 1)[0] + "\t" + score)
    message = _message(glue_dir, "STS-B", "dev")
    assert f"{path} line 2, column 'score': STS-B score {score!r}" in message
    assert "not a number from 0 to 5" in message


def test_empty_file(glue_dir):
    (glue_dir / "CoLA" / "dev.tsv").write_text("", encoding="utf-8")
    message = _message(glue_dir, "CoLA", "dev")
    assert "is empty" in message and "no header line" in message


def test_non_utf8_file(glue_dir):
    (glue_dir / "WNLI" / "dev.tsv").write_bytes(
        b"index\tsentence1\tsentence2\tlabel\n0\t\xff\tx\t1\n"
    )
    assert "is not UTF-8 text" in _message(glue_dir, "WNLI", "dev")


def test_unknown_split_lists_the_task_splits(glue_dir):
    message = _message(glue_dir, "SST-2", "dev_matched")
    assert "SST-2 has no split 'dev_matched'; its splits: train, dev, test" in message
