"""slurm/pretrain_large.sh with the real training program on the local 2-node slurm cluster.

Tiny CPU runs of pretrain/pretrain_vqmoe.py (pretrain/configs/tiny.yaml on the SOTU fixture
shards), 2 nodes x 1 rank: world 2, expert parallel 2, ZeRO-2 across the nodes over gloo. One run
trains to the end; the others are preempted while training, by `scancel --signal=USR1` (what
`--signal=USR1@secs` sends) and by `scontrol requeue` (SIGTERM), and the requeued job resumes
from the checkpoint the ranks saved.
"""

from __future__ import annotations

import json
import math
import re
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from data_helpers import tiny_shards
from pretrain_helpers import records
from slurm_cluster import CPU_NODE_ARGS, NODES, SlurmCluster, program_env, read_marker

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
# Every run: 2 ranks, 2 expert-parallel groups of the 4 experts, no TensorBoard files.
COMMON = "parallel.expert_parallel=2 train.tensorboard=false"
# Long enough that a run is still training when the test signals it after a few steps (tiny
# steps take 0.1-0.3 s here); the requeued run trains the rest.
PREEMPTED_STEPS = 300


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_shards(tmp_path_factory, "main")


def _submit(cluster: SlurmCluster, shards: Path, out: Path, log: Path, extra: str) -> str:
    """sbatch pretrain_large.sh on both nodes, one rank each, into ``out``; return the job id."""
    env = program_env(
        REPO,
        CONFIG="pretrain/configs/tiny.yaml",
        DATA_DIR=str(shards),
        OUTPUT_DIR=str(out),
        EXTRA=f"{extra} {COMMON}",
    )
    return cluster.submit(
        REPO / "slurm" / "pretrain_large.sh",
        env=env,
        args=["-N", "2", *CPU_NODE_ARGS, f"--output={log}"],
    )


def _preempt_and_resume(
    cluster: SlurmCluster, shards: Path, tmp_path: Path, preempt: Callable[[str], None]
) -> tuple[int, str]:
    """Start a long run, wait for a few logged steps, ``preempt(job)`` it, let the requeued run
    finish; check what both runs did. Returns the signal the ranks saved on and the job log."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    extra = (
        f"train.steps={PREEMPTED_STEPS} train.log_interval=1 train.eval_interval=0 "
        "train.save_interval=100000"
    )
    job = _submit(cluster, shards, out, log, extra)
    cluster.while_running(job, lambda: len(records(out)) >= 3 or None)
    preempt(job)
    # Rank 0 writes the marker after the ranks saved; it lasts until the requeued run starts
    # (slurm holds a requeued job for cred_expire, 10 s on the test cluster).
    marker = out / "preempted"
    stopped = cluster.while_running(job, lambda: read_marker(marker))
    first_run = records(out)
    assert cluster.wait(job, timeout=900) == "COMPLETED", log.read_text()

    text = log.read_text()
    found = re.fullmatch(r"step (\d+) signal (\d+)\n", stopped)
    assert found, stopped
    step, signum = int(found[1]), int(found[2])
    assert 3 <= step < PREEMPTED_STEPS, text
    assert cluster.job(job)["Restarts"] == "1"
    assert "run 1 on" in text and "run 2 on" in text, text
    assert f"0: [vqmoe] stopping at step {step} on a signal" in text

    # The first run saved every rank's state at the step it stopped; the second resumed there.
    checkpoint = out / "checkpoints" / f"step_{step:08d}"
    assert (checkpoint / "COMPLETE").read_text() == f"{step}\n"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == step
    ranks = sorted(p.name for p in (checkpoint / "rank_states").iterdir())
    assert ranks == ["rank_00000.pt", "rank_00001.pt"]
    assert f"0: [vqmoe] resumed from {checkpoint} at step {step}" in text
    assert f"0: [vqmoe] training steps {step + 1}..{PREEMPTED_STEPS}" in text

    # metrics.jsonl (appended to by both runs): 1..step, then step+1..the end, no gap or repeat.
    assert [r["step"] for r in first_run] == list(range(1, step + 1))
    both_runs = records(out)
    assert both_runs[: len(first_run)] == first_run
    assert [r["step"] for r in both_runs[len(first_run) :]] == list(
        range(step + 1, PREEMPTED_STEPS + 1)
    )
    assert all(math.isfinite(r["loss"]) for r in both_runs)
    assert (out / "complete").read_text() == f"{PREEMPTED_STEPS}\n"
    assert (out / "checkpoints" / "latest").read_text() == f"step_{PREEMPTED_STEPS:08d}"
    assert not marker.exists()
    return signum, text


def test_two_node_tiny_pretraining_trains_and_checkpoints(
    slurm_cluster: SlurmCluster, shards: Path, tmp_path: Path
) -> None:
    """20 steps on 2 nodes: both ranks run, the loss is finite and falls, the run is saved."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    extra = "train.steps=20 train.log_interval=5 train.save_interval=10 train.eval_interval=10"
    job = _submit(slurm_cluster, shards, out, log, extra)

    assert slurm_cluster.wait(job, timeout=600) == "COMPLETED", log.read_text()
    text = log.read_text()
    assert f"[vqmoe] repository {REPO} at" in text
    for rank, node in enumerate(NODES):
        assert f"{rank}: [vqmoe] node {rank} ({node}):" in text, text
    assert "0: [vqmoe] layout: world 2 = TP 1 x DP 2 (EP 2 x expert-DP 1)" in text, text
    assert "0: [vqmoe] training complete" in text, text
    assert text.count("launch ended with status 0") == 1, text
    assert slurm_cluster.job(job)["Restarts"] == "0"

    train = records(out)
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    losses = [r["loss"] for r in train]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0], losses
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [10, 20]
    assert all(math.isfinite(r["loss"]) for r in evals), evals

    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000020"
    final = checkpoints / "step_00000020"
    assert (final / "COMPLETE").read_text() == "20\n"
    ranks = sorted(p.name for p in (final / "rank_states").iterdir())
    assert ranks == ["rank_00000.pt", "rank_00001.pt"]
    assert (checkpoints / "step_00000010" / "COMPLETE").is_file()
    assert (out / "complete").read_text() == "20\n"
    assert not (out / "preempted").exists()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["parallel"]["expert_parallel"] == 2
    assert config["train"]["zero_stage"] == 2
    assert config["train"]["steps"] == 20
    assert config["data"]["data_dir"] == str(shards)


def test_usr1_checkpoints_real_training_and_requeued_job_resumes(
    slurm_cluster: SlurmCluster, shards: Path, tmp_path: Path
) -> None:
    """`scancel --signal=USR1`: the ranks save at the current step, the job requeues itself, the
    next run resumes from that checkpoint and trains the remaining steps."""
    signum, text = _preempt_and_resume(
        slurm_cluster, shards, tmp_path, lambda job: slurm_cluster.signal(job, "USR1")
    )
    assert signum == signal.SIGUSR1, text
    # Both launches exited 0 (SIGUSR1 did not kill the launchers); the batch script requeued.
    assert text.count("launch ended with status 0") == 2, text
    assert text.count("exists: requeueing job") == 1, text


def test_scontrol_requeue_sigterm_saves_and_requeued_job_resumes(
    slurm_cluster: SlurmCluster, shards: Path, tmp_path: Path
) -> None:
    """`scontrol requeue` (SIGTERM to every process, slurm requeues): the ranks save within
    KillWait and the next run resumes from that checkpoint."""
    signum, text = _preempt_and_resume(slurm_cluster, shards, tmp_path, slurm_cluster.requeue)
    assert signum == signal.SIGTERM, text
    # slurm requeued the job itself: the batch shell was terminated before it could.
    assert "exists: requeueing job" not in text, text
