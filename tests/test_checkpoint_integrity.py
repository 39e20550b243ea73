"""Damaged and tampered checkpoints: every file of a step directory (and of a consolidated one)
missing or truncated in turn is refused naming the file and the intact checkpoint to use instead;
a resume falls back to that one only with ``train.resume_fallback=true``; loading runs no code
from any file of a checkpoint."""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from convert_helpers import assert_one_error_line, cli, convert, shards
from pretrain_helpers import pretrain

from vqmoe_megatron.checkpoint.errors import CheckpointError
from vqmoe_megatron.checkpoint.opened import pretrained_config
from vqmoe_megatron.checkpoint.training import checkpoint_problem, read_rank_state
from vqmoe_megatron.compat.checkpoint_io import apply_checkpoint_io_patches

pytestmark = pytest.mark.slow

STEP_FILES = (
    "COMPLETE",  # its absence marks an unfinished save: the run's previous checkpoint is used
    "config.yaml",
    "trainer_state.json",
    "rank_states/rank_00000.pt",
    "dist/.metadata",
    "dist/metadata.json",
    "dist/common.pt",
    "dist/__0_0.distcp",
    "dist/__0_1.distcp",
)
CONSOLIDATED_FILES = ("model.safetensors", "config.yaml", "tokenizer.model", "conversion.json")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny run with two checkpoints (steps 2 and 3) and its consolidated copy."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    pretrain(
        shards(tmp_path_factory),
        out,
        "train.steps=3",
        "train.save_interval=2",
        "train.zero_stage=1",
    )
    convert("consolidated", out, out.parent / "consolidated", "--no-verify")
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _damage(file: Path, how: str) -> None:
    if how == "missing":
        file.unlink()
    else:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _drop_file_record(step: Path) -> None:
    """Make ``step`` look like a checkpoint written before the file record existed."""
    state = json.loads((step / "trainer_state.json").read_text())
    del state["files"]
    (step / "trainer_state.json").write_text(json.dumps(state))


def test_the_damage_tests_cover_every_file_a_checkpoint_has(run):
    step = run / "checkpoints" / "step_00000003"
    assert sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file()) == sorted(
        STEP_FILES
    )
    consolidated = run.parent / "consolidated"
    assert sorted(p.name for p in consolidated.iterdir()) == sorted(CONSOLIDATED_FILES)


@pytest.mark.parametrize("how", ["missing", "truncated"])
@pytest.mark.parametrize("name", STEP_FILES[1:])
def test_damaged_step_file_is_named_with_the_intact_checkpoint(run, tmp_path, name, how):
    copy = _copy(run, tmp_path)
    step = copy / "checkpoints" / "step_00000003"
    _damage(step / name, how)
    with pytest.raises(CheckpointError) as error:
        pretrained_config(copy)
    message = str(error.value)
    assert str(step / name) in message, message
    assert f"{copy / 'checkpoints' / 'step_00000002'}: use it instead" in message


def test_truncated_complete_marker_is_named(run, tmp_path):
    copy = _copy(run, tmp_path)
    (copy / "checkpoints" / "step_00000003" / "COMPLETE").write_text("")
    with pytest.raises(CheckpointError, match="COMPLETE is damaged"):
        pretrained_config(copy)


@pytest.mark.parametrize("how", ["missing", "truncated"])
@pytest.mark.parametrize("name", ["model.safetensors", "config.yaml", "tokenizer.model"])
def test_damaged_consolidated_file_is_named_with_its_source(run, tmp_path, name, how):
    consolidated = tmp_path / "consolidated"
    shutil.copytree(run.parent / "consolidated", consolidated)
    _damage(consolidated / name, how)
    with pytest.raises(CheckpointError) as error:
        pretrained_config(consolidated)
    message = str(error.value)
    assert str(consolidated / name) in message, message
    assert f"converted from {run / 'checkpoints' / 'step_00000003'}, which is intact" in message


def test_consolidated_record_damaged_or_missing(run, tmp_path):
    """conversion.json only records the conversion: without it the directory loads as one
    written before records existed; a truncated one is named."""
    consolidated = tmp_path / "consolidated"
    shutil.copytree(run.parent / "consolidated", consolidated)
    _damage(consolidated / "conversion.json", "truncated")
    with pytest.raises(CheckpointError, match="conversion.json is damaged"):
        pretrained_config(consolidated)
    (consolidated / "conversion.json").unlink()
    assert pretrained_config(consolidated).model.num_layers == 2


def test_checkpoint_written_before_the_file_record_is_checked_by_structure(run, tmp_path):
    copy = _copy(run, tmp_path)
    step = copy / "checkpoints" / "step_00000003"
    _drop_file_record(step)
    assert checkpoint_problem(step) is None
    for name in ("dist/__0_1.distcp", "rank_states/rank_00000.pt", "dist/common.pt"):
        shutil.copy(step / name, tmp_path / "saved")
        _damage(step / name, "truncated" if name.endswith("distcp") else "missing")
        assert str(step / name) in checkpoint_problem(step)
        shutil.copy(tmp_path / "saved", step / name)


def test_cli_consumers_print_one_error_line(run, tmp_path, tmp_path_factory):
    copy = _copy(run, tmp_path)
    step = copy / "checkpoints" / "step_00000003"
    _damage(step / "dist" / "__0_0.distcp", "truncated")
    intact = str(copy / "checkpoints" / "step_00000002")
    proc = convert("consolidated", copy, tmp_path / "out", check=False)
    assert_one_error_line(proc, str(step / "dist" / "__0_0.distcp"), intact)
    assert not (tmp_path / "out").exists()
    proc = cli(
        "vqmoe_megatron.evaluate",
        "--checkpoint",
        step,
        "--data-dir",
        shards(tmp_path_factory),
        check=False,
    )
    assert_one_error_line(proc, "truncated", intact)


def test_resume_refuses_a_damaged_latest_checkpoint_and_falls_back_only_when_told(
    run, tmp_path, tmp_path_factory
):
    copy = _copy(run, tmp_path)
    damaged_file = copy / "checkpoints" / "step_00000003" / "rank_states" / "rank_00000.pt"
    _damage(damaged_file, "missing")
    data = shards(tmp_path_factory)
    proc = pretrain(data, copy, "train.steps=4", "train.zero_stage=1", check=False)
    assert_one_error_line(proc, str(damaged_file), "step_00000002", "train.resume_fallback=true")
    assert not (copy / "checkpoints" / "step_00000004").exists()
    proc = pretrain(data, copy, "train.steps=4", "train.zero_stage=1", "train.resume_fallback=true")
    output = proc.stdout + proc.stderr
    assert f"resuming from {copy / 'checkpoints' / 'step_00000002'}" in output
    assert "training steps 3..4" in output
    assert (copy / "checkpoints" / "step_00000004" / "COMPLETE").is_file()


class _Tampered:
    """Unpickling this runs code: it touches ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_tampered_rank_file_runs_no_code(run, tmp_path):
    marker = tmp_path / "ran"
    rank_file = tmp_path / "rank_00000.pt"
    torch.save({"rng": _Tampered(marker), "loader": {}}, rank_file)
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        read_rank_state(rank_file)
    assert not marker.exists()
    intact = run / "checkpoints" / "step_00000003" / "rank_states" / "rank_00000.pt"
    assert read_rank_state(intact)["loader"]["batches"] == 3


def test_tampered_tensor_index_runs_no_code(run, tmp_path):
    copy = _copy(run, tmp_path)
    step = copy / "checkpoints" / "step_00000003"
    marker = tmp_path / "ran"
    (step / "dist" / ".metadata").write_bytes(pickle.dumps(_Tampered(marker)))
    _drop_file_record(step)  # else the record names the changed size
    with pytest.raises(CheckpointError, match="not a checkpoint index, refusing"):
        pretrained_config(copy)
    apply_checkpoint_io_patches()  # the reader every load goes through refuses it as well
    from megatron.core import dist_checkpointing

    with pytest.raises(Exception, match="which a checkpoint never holds"):
        dist_checkpointing.load_tensors_metadata(str(step / "dist"))
    assert not marker.exists()


def test_tampered_byte_item_runs_no_code(run, tmp_path):
    """A non-tensor item (megatron's ``_extra_state``) pointed at a pickle that runs code."""
    copy = _copy(run, tmp_path)
    step = copy / "checkpoints" / "step_00000003"
    marker = tmp_path / "ran"
    index = step / "dist" / ".metadata"
    metadata = pickle.loads(index.read_bytes())  # the test's own, intact file
    payload = io.BytesIO()
    torch.save([_Tampered(marker)], payload)
    shard = step / "dist" / "__0_0.distcp"
    offset = shard.stat().st_size
    with shard.open("ab") as stream:
        stream.write(payload.getvalue())
    for key, info in metadata.storage_data.items():
        if "_extra_state" in key.fqn:
            info.relative_path, info.offset, info.length = (
                "__0_0.distcp",
                offset,
                len(payload.getvalue()),
            )
    index.write_bytes(pickle.dumps(metadata))
    _drop_file_record(step)  # else the record names the changed sizes; here the load must refuse
    proc = convert("consolidated", copy, tmp_path / "out", "--no-verify", check=False)
    assert_one_error_line(proc, f"cannot read the weights of {step}")
    assert not marker.exists()
