"""Hostile command lines of the checkpoint consumers end in one ``error:`` line before any work
(impossible outputs, layouts below 1), and an output directory that cannot exist is named."""

from __future__ import annotations

import pytest
from convert_helpers import assert_one_error_line, cli, convert, shards
from pretrain_helpers import pretrain


@pytest.fixture
def a_file(tmp_path):
    file = tmp_path / "a_file"
    file.write_text("not a directory\n")
    return file


def test_convert_output_under_a_file_is_refused(a_file, tmp_path):
    proc = convert("consolidated", tmp_path, a_file / "out", check=False)
    assert_one_error_line(proc, f"{a_file} is a file, not a directory")


@pytest.mark.parametrize("module", ["vqmoe_megatron.convert", "vqmoe_megatron.evaluate"])
def test_layouts_below_one_are_refused(module, tmp_path):
    args = (
        ["consolidated", tmp_path, tmp_path / "out"]
        if module.endswith("convert")
        else ["--checkpoint", tmp_path, "--data-dir", tmp_path]
    )
    proc = cli(module, *args, "--tensor-parallel", "0", check=False)
    assert_one_error_line(proc, "--tensor-parallel and --expert-parallel must be at least 1")


def test_evaluate_json_in_a_missing_directory_is_refused(tmp_path):
    proc = cli(
        "vqmoe_megatron.evaluate",
        *("--checkpoint", tmp_path, "--data-dir", tmp_path),
        *("--json", tmp_path / "missing" / "result.json"),
        check=False,
    )
    assert_one_error_line(proc, "--json", "give a file in an existing directory")


@pytest.mark.slow
def test_pretraining_output_dir_that_is_a_file_is_refused(tmp_path_factory, a_file):
    proc = pretrain(shards(tmp_path_factory), a_file, "train.steps=1", check=False)
    assert_one_error_line(proc, f"train.output_dir={a_file}: ", "is a file, not a directory")
    assert a_file.read_text() == "not a directory\n"
