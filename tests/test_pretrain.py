"""End-to-end pretraining runs of the real CLI on the SOTU fixture (tiny config, CPU, gloo).

Covers: loss drops and every output is written; bit-exact resume after a clean stop; SIGTERM
mid-run leaves a loadable checkpoint and the rerun continues exactly (2 ranks, EP = 2, ZeRO-2);
partial saves fall back to the last complete checkpoint; incompatible configs are refused;
non-finite losses are skipped, then abort; the expert-parallel size changes on resume; the
DeepSpeed and MPI launchers; --dry-run of the large config; bad data settings.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import FIXTURE, shard_settings, tiny_shards
from pretrain_helpers import (
    CONFIG,
    REPO,
    SCRIPT,
    env,
    losses,
    overrides,
    pretrain,
    records,
    resumed_like_uninterrupted,
    run_and_signal_one_rank,
)

from vqmoe_megatron.checkpoint.training import CheckpointError, find_latest
from vqmoe_megatron.convert.source import open_source
from vqmoe_megatron.data import load_manifest
from vqmoe_megatron.data.sharding import build_shards
from vqmoe_megatron.data.tokenizer_training import TokenizerSettings, train_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory, "pretrain", shard_size_mb=0.05)


def test_tiny_run_learns_and_writes_its_outputs(shards, tmp_path):
    out = tmp_path / "run"
    proc = pretrain(
        shards, out, "train.steps=60", "train.eval_interval=30", "train.save_interval=30"
    )
    train = records(out)
    assert [r["step"] for r in train] == list(range(1, 61))
    first = sum(r["loss"] for r in train[:5]) / 5
    last = sum(r["loss"] for r in train[-5:]) / 5
    assert math.isfinite(last) and last < first - 0.8, (first, last)
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [30, 60]
    assert 0 < evals[-1]["bpb"] < evals[-1]["loss"] / math.log(2)
    assert evals[-1]["ppl"] == pytest.approx(math.exp(evals[-1]["loss"]), rel=1e-6)
    last_train = train[-1]
    for key in (
        "lr",
        "grad_norm",
        "tokens_per_s",
        "tflops_per_device",
        "layer1/code_perplexity",
        "layer1/gate_discrete",
        "layer1/imbalance",
        "layer1/load_balancing_loss",
    ):
        assert key in last_train, key
    assert (out / "complete").is_file() and (out / "config.yaml").is_file()
    assert find_latest(out / "checkpoints").name == "step_00000060"
    assert "training complete" in proc.stdout


@pytest.mark.parametrize(
    "precision,zero,codebook_update", [("fp32", 2, "gradient"), ("bf16", 1, "ema")]
)
def test_resume_after_clean_stop_is_bit_exact(shards, tmp_path, precision, zero, codebook_update):
    """Dead-code restarts every 3 steps (at steps 3 and 6, around the resume at step 4) with
    candidates sampled per step, through ZeRO's master weights or the EMA buffers."""
    extra = (
        f"train.precision={precision}",
        f"train.zero_stage={zero}",
        f"moe.codebook_update={codebook_update}",
        "moe.dead_code_interval=3",
        "moe.dead_code_threshold=0.9",
    )
    proc = resumed_like_uninterrupted(shards, tmp_path, 8, 4, *extra)
    assert "restarted" in proc.stdout, "a dead-code restart after the resume"
    if precision == "fp32":  # a finished run given again: nothing trained, nothing re-saved
        final = find_latest(tmp_path / "b" / "checkpoints")
        written = final.stat().st_mtime_ns
        again = pretrain(shards, tmp_path / "b", "train.steps=8", *extra)
        assert "no steps left: resumed at step 8 of 8" in again.stdout
        assert find_latest(tmp_path / "b" / "checkpoints") == final
        assert final.stat().st_mtime_ns == written
        assert losses(tmp_path / "b") == losses(tmp_path / "a")


@pytest.mark.distributed
def test_sigterm_mid_run_checkpoints_and_rerun_continues_exactly(shards, tmp_path):
    """2 ranks, EP = 2, ZeRO-2: a run whose rank 1 gets SIGTERM equals an uninterrupted one."""
    extra = ("train.steps=40", "parallel.expert_parallel=2", "train.zero_stage=2")
    reference = tmp_path / "reference"
    pretrain(shards, reference, *extra, nproc=2, launcher="torchrun")
    out = tmp_path / "killed"
    args = ["--config", str(CONFIG), *overrides(shards, out, *extra)]
    returncode, output = run_and_signal_one_rank(SCRIPT, args, out, after_step=3)
    assert returncode == 0, output[-3000:]
    stopped = int((out / "preempted").read_text().split()[1])
    assert 3 <= stopped < 40
    assert find_latest(out / "checkpoints").name == f"step_{stopped:08d}"
    assert not (out / "complete").exists()
    rerun = pretrain(shards, out, *extra, nproc=2, launcher="torchrun")
    assert f"at step {stopped}" in rerun.stdout
    assert not (out / "preempted").exists() and (out / "complete").exists()
    assert losses(out) == losses(reference)


def test_partial_save_falls_back_to_last_complete_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    pretrain(shards, out, "train.steps=4", "train.save_interval=2")
    root = out / "checkpoints"
    (root / "step_00000004" / "COMPLETE").unlink()  # a save that died before it finished
    (root / "step_00000006.partial").mkdir()
    assert find_latest(root).name == "step_00000002"
    proc = pretrain(shards, out, "train.steps=5")
    assert "step_00000002 at step 2" in proc.stdout


def test_resume_with_an_incompatible_model_is_refused(shards, tmp_path):
    out = tmp_path / "run"
    pretrain(shards, out, "train.steps=2")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = pretrain(shards, out, "train.steps=4", "model.hidden_size=96", check=False)
    assert proc.returncode == 2
    assert "model.hidden_size: checkpoint 64, config 96" in proc.stderr
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_resume_on_data_of_another_tokenizer_is_refused_unless_allowed(
    shards, tmp_path, tmp_path_factory
):
    """Same vocabulary size, other pieces: refused even with train.reset_dataloader=true."""
    other = train_tokenizer(
        TokenizerSettings([str(FIXTURE)], str(tmp_path / "bpe"), vocab_size=400, model_type="bpe"),
        progress=False,
    )
    other_shards = tmp_path / "other_shards"
    build_shards(
        shard_settings(tmp_path_factory, other_shards, tokenizer=other["model"]),
        progress=False,
        log=lambda _: None,
    )
    mine = load_manifest(shards)
    out = tmp_path / "run"
    pretrain(shards, out, "train.steps=2")
    switch = (f"data.data_dir={other_shards}", "train.steps=4", "train.reset_dataloader=true")
    proc = pretrain(shards, out, *switch, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = proc.stderr.splitlines()
    for text in (mine.tokenizer_sha256, mine.tokenizer_model, other["sha256"], other["model"]):
        assert text in line
    assert "train.allow_tokenizer_change=true" in line
    proc = pretrain(shards, out, *switch, "train.allow_tokenizer_change=true")
    assert "train.allow_tokenizer_change=true: continuing" in proc.stderr
    assert find_latest(out / "checkpoints").name == "step_00000004"
    with pytest.raises(
        CheckpointError, match=f"sha256 {other['sha256']}.*sha256 {mine.tokenizer_sha256}"
    ):
        open_source(out, Path(mine.tokenizer_model))  # convert / evaluate: the new one now


def test_nonfinite_losses_are_skipped_then_abort(shards, tmp_path):
    out = tmp_path / "skip"
    pretrain(shards, out, "train.steps=6", "train.inject_nonfinite_steps=[3]")
    train = records(out)
    assert train[-1]["skipped_steps"] == 1 and math.isfinite(train[-1]["loss"])
    out = tmp_path / "abort"
    proc = pretrain(
        shards,
        out,
        "train.steps=10",
        "train.save_interval=2",
        "train.max_nonfinite_steps=3",
        "train.inject_nonfinite_steps=[5,6,7]",
        check=False,
    )
    assert proc.returncode == 2
    assert "3 non-finite losses in a row (steps 5..7)" in proc.stderr
    assert "step_00000004" in proc.stderr
    assert find_latest(out / "checkpoints").name == "step_00000004"


@pytest.mark.distributed
def test_expert_parallel_size_changes_on_resume(shards, tmp_path):
    """Saved at EP = 2, resumed at EP = 1 (same 2 data-parallel ranks): the run continues as if
    nothing happened (up to reduction order)."""
    reference = tmp_path / "reference"
    pretrain(
        shards,
        reference,
        "train.steps=8",
        "parallel.expert_parallel=2",
        nproc=2,
        launcher="torchrun",
    )
    out = tmp_path / "changed"
    pretrain(
        shards, out, "train.steps=4", "parallel.expert_parallel=2", nproc=2, launcher="torchrun"
    )
    proc = pretrain(
        shards, out, "train.steps=8", "parallel.expert_parallel=1", nproc=2, launcher="torchrun"
    )
    assert "at step 4" in proc.stdout
    got, want = losses(out), losses(reference)
    for step in range(5, 9):
        assert got[step][0] == pytest.approx(want[step][0], rel=1e-5, abs=1e-6), step


@pytest.mark.distributed
def test_data_parallel_size_changes_on_resume(shards, tmp_path):
    out = tmp_path / "run"
    pretrain(shards, out, "train.steps=6", nproc=2, launcher="torchrun")
    proc = pretrain(shards, out, "train.steps=10")
    assert "at another parallel layout" in proc.stderr
    resumed = losses(out)
    assert abs(resumed[7][0] - resumed[6][0]) < 0.5


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun"])
def test_other_launchers(shards, tmp_path, launcher):
    if launcher == "mpirun" and (shutil.which("mpirun") is None or not _has_mpi4py()):
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but mpirun/mpi4py are missing (pip install -e '.[mpi]')")
        pytest.skip("mpirun or mpi4py not installed (pip install -e '.[mpi]')")
    out = tmp_path / launcher
    proc = pretrain(
        shards, out, "train.steps=3", "parallel.expert_parallel=2", nproc=2, launcher=launcher
    )
    assert "world 2" in proc.stdout + proc.stderr
    assert len(records(out)) == 3


def _has_mpi4py() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


def test_dry_run_of_the_large_config_counts_about_a_billion_parameters():
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--config",
            str(REPO / "pretrain/configs/large.yaml"),
            "--dry-run",
            "--world-size",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(),
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    total = int(proc.stdout.split("parameters: total ")[1].split()[0].replace(",", ""))
    assert 0.9e9 < total < 1.1e9
    assert (
        "training FLOPs per token" in proc.stdout and "estimated memory per device" in proc.stdout
    )


def test_bad_data_settings_give_one_clear_error(shards, tmp_path):
    proc = pretrain(shards, tmp_path / "x", f"data.data_dir={tmp_path / 'missing'}", check=False)
    assert proc.returncode == 2 and str(tmp_path / "missing") in proc.stderr
    proc = pretrain(shards, tmp_path / "y", "model.seq_length=128", check=False)
    assert proc.returncode == 2 and "128" in proc.stderr and "64" in proc.stderr
    assert "Traceback" not in proc.stderr
