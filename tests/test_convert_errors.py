"""Conversions refuse incomplete, damaged and mismatched inputs with one clear error line and
leave no output behind; a failed self-check writes nothing either."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from convert_helpers import assert_one_error_line, convert, other_tokenizer, run_of

from vqmoe_megatron.checkpoint.training import CheckpointError, find_latest
from vqmoe_megatron.config import PretrainConfig
from vqmoe_megatron.convert.hf import check_exportable
from vqmoe_megatron.convert.source import with_layout

pytestmark = pytest.mark.slow


@pytest.fixture
def run_copy(tmp_path_factory, tmp_path) -> Path:
    """A private copy of the EP = 1 run (tests damage it)."""
    copy = tmp_path / "run"
    shutil.copytree(run_of(tmp_path_factory, "ep1_zero1"), copy)
    return copy


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "partial" in p.name or p.name == "out")


def test_checkpoint_without_complete_marker_is_refused(run_copy, tmp_path):
    step = find_latest(run_copy / "checkpoints")
    (step / "COMPLETE").unlink()
    proc = convert("consolidated", step, tmp_path / "out", check=False)
    assert_one_error_line(proc, "incomplete checkpoint", "COMPLETE")
    assert _leftovers(tmp_path) == []


def test_truncated_tensor_file_is_refused(run_copy, tmp_path):
    step = find_latest(run_copy / "checkpoints")
    shard = sorted((step / "dist").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = convert("hf", run_copy, tmp_path / "out", check=False)
    assert_one_error_line(proc, f"checkpoint {step} is damaged", f"{shard} is truncated")
    assert _leftovers(tmp_path) == []


def test_truncated_consolidated_weights_are_refused(run_copy, tmp_path):
    convert("consolidated", run_copy, tmp_path / "c")
    weights = tmp_path / "c" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    proc = convert("hf", tmp_path / "c", tmp_path / "out", check=False)
    assert_one_error_line(proc, "is damaged", f"{weights} is truncated")


def test_consolidated_config_that_does_not_match_the_weights_is_refused(run_copy, tmp_path):
    convert("consolidated", run_copy, tmp_path / "c")
    config = tmp_path / "c" / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["model"]["ffn_hidden_size"] = 96
    raw["moe"]["expert_ffn_hidden_size"] = 96
    config.write_text(yaml.safe_dump(raw))
    (tmp_path / "c" / "conversion.json").unlink()  # else its size record names config.yaml
    proc = convert("consolidated", tmp_path / "c", tmp_path / "out", check=False)
    assert_one_error_line(
        proc,
        f"{tmp_path / 'c' / 'model.safetensors'} does not fit the model its config describes",
        # expert weights per expert (128, 64) or stacked (E, 128, 64), by expert backend
        "128, 64) in the file, (",
        "96, 64) expected",
    )


def test_tokenizer_with_another_vocabulary_is_refused(run_copy, tmp_path):
    proc = convert(
        "hf", run_copy, tmp_path / "out", "--tokenizer", other_tokenizer(tmp_path), check=False
    )
    assert_one_error_line(proc, "vocabulary mismatch", "384", "model.vocab_size=400")
    assert _leftovers(tmp_path) == []


def test_existing_output_is_never_overwritten(run_copy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = convert("consolidated", run_copy, out, check=False)
    assert_one_error_line(proc, "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_verification_writes_nothing(run_copy, tmp_path):
    proc = convert("hf", run_copy, tmp_path / "out", "--tolerance", "-1", check=False)
    assert_one_error_line(proc, "logits differ from the source model's", "not written")
    assert _leftovers(tmp_path) == []


def test_reshard_refuses_a_consolidated_directory(run_copy, tmp_path):
    convert("consolidated", run_copy, tmp_path / "c")
    proc = convert("reshard", tmp_path / "c", "--output", tmp_path / "out", check=False)
    assert_one_error_line(proc, "consolidated directory", "any layout")


def test_hf_export_refuses_models_it_does_not_implement():
    cfg = PretrainConfig()
    cfg = replace(cfg, moe=replace(cfg.moe, capacity_factor=1.25))
    with pytest.raises(CheckpointError, match="dropless"):
        check_exportable(cfg)


def test_layouts_that_do_not_divide_the_model_are_refused():
    cfg = PretrainConfig()  # 8 heads, 16 experts
    with pytest.raises(CheckpointError, match="attention heads 8 by 3, query groups 8 by 3"):
        with_layout(cfg, 3, 1)
    with pytest.raises(CheckpointError, match="experts 16 by 3"):
        with_layout(cfg, 1, 3)
    assert with_layout(cfg, 2, 4, "discrete").moe.routing_mode == "discrete"
