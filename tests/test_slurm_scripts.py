"""The sbatch scripts in slurm/ on a real local 2-node cluster, with a stand-in training program.

The stand-in (tests/slurm_standin_train.py) keeps the training programs' contract: save on
SIGUSR1/SIGTERM, rank 0 writes ``preempted``, exit 0; resume from checkpoints; ``complete``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import slurm_standin_train as standin
from slurm_cluster import CPU_NODE_ARGS, FINAL_STATES, NODES, SlurmCluster, wait_for

pytestmark = pytest.mark.slurm
SLURM_DIR = Path(__file__).resolve().parents[1] / "slurm"


def _events(out: Path, event: str, restart: int) -> list[dict[str, object]]:
    """The stand-in's events of one kind from one run of the job."""
    return [e for e in standin.read_events(out) if e["event"] == event and e["restart"] == restart]


def _wait_started(cluster: SlurmCluster, job: str, out: Path, ranks: int) -> None:
    """Wait until every rank of the job's first run has installed its handlers and started."""

    def started() -> bool | None:
        if cluster.state(job) in FINAL_STATES:
            raise AssertionError(f"job {job} ended before its ranks started: {cluster.job(job)}")
        return len(_events(out, "started", 0)) == ranks or None

    wait_for(started, timeout=180, what=f"{ranks} ranks of job {job} to start")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_usr1_checkpoints_every_rank_then_job_requeues_and_resumes(
    slurm_cluster: SlurmCluster, tmp_path: Path, launcher: str
) -> None:
    """`scancel --signal=USR1` (what `--signal=USR1@secs` sends) reaches the ranks on both nodes;
    the launchers survive it, every rank saves, the job requeues itself and the next run resumes."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    env = {**standin.script_env(out, extra="standin.wait_for_signal=300"), "LAUNCHER": launcher}
    job = slurm_cluster.submit(
        SLURM_DIR / "pretrain_large.sh",
        env=env,
        args=["-N", "2", *CPU_NODE_ARGS, f"--output={log}"],
    )
    _wait_started(slurm_cluster, job, out, ranks=2)
    slurm_cluster.signal(job, "USR1")

    assert slurm_cluster.wait(job, timeout=300) == "COMPLETED", log.read_text()
    text = log.read_text()
    first = {e["node"]: e["signal"] for e in _events(out, "signal", 0)}
    assert first == {NODES[0]: "SIGUSR1", NODES[1]: "SIGUSR1"}, text
    assert len(_events(out, "saved", 0)) == 2, text
    # Both runs' launches exited 0: the per-node launchers were not killed by SIGUSR1.
    assert text.count("launch ended with status 0") == 2, text
    assert text.count("exists: requeueing job") == 1, text
    assert slurm_cluster.job(job)["Restarts"] == "1"
    second = _events(out, "started", 1)
    assert sorted(e["node"] for e in second) == list(NODES), text
    assert all(e["resumed"] and e["world_size"] == 2 for e in second), text
    assert (out / "complete").exists() and not (out / "preempted").exists()


@pytest.mark.slow
def test_scontrol_requeue_sends_sigterm_ranks_save_and_the_next_run_resumes(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """Requeue from outside (an admin, or slurm preemption in REQUEUE mode): SIGTERM reaches the
    ranks on both nodes, they save within KillWait, slurm requeues, the next run resumes."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = slurm_cluster.submit(
        SLURM_DIR / "pretrain_large.sh",
        env=standin.script_env(out, extra="standin.wait_for_signal=300"),
        args=["-N", "2", *CPU_NODE_ARGS, f"--output={log}"],
    )
    _wait_started(slurm_cluster, job, out, ranks=2)
    slurm_cluster.requeue(job)

    assert slurm_cluster.wait(job, timeout=300) == "COMPLETED", log.read_text()
    first = {e["node"]: e["signal"] for e in _events(out, "signal", 0)}
    assert first == {NODES[0]: "SIGTERM", NODES[1]: "SIGTERM"}, log.read_text()
    assert len(_events(out, "saved", 0)) == 2, log.read_text()
    assert slurm_cluster.job(job)["Restarts"] == "1"
    assert all(e["resumed"] for e in _events(out, "started", 1))
    assert (out / "complete").exists() and not (out / "preempted").exists()


@pytest.mark.slow
def test_time_limit_signal_from_sbatch_header_reaches_training(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """The `--signal=USR1@secs` path itself (slurm's timer, no scancel), via pretrain_small.sh.

    A 4-minute limit with the signal due 150 s before it, i.e. 90 s into the run. Slurm may send
    it up to 60 s early (sbatch(1), --signal) or one 30 s check interval late, so it lands 30 to
    120 s in: after the training processes are up (a signal sent before the job step exists is
    lost, and slurm does not send it twice) and before they give up waiting at 190 s. The
    requeued run resumes and completes well within its own limit.
    """
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = slurm_cluster.submit(
        SLURM_DIR / "pretrain_small.sh",
        env=standin.script_env(out, extra="standin.wait_for_signal=190"),
        args=[*CPU_NODE_ARGS, "--time=4", "--signal=USR1@150", f"--output={log}"],
        script_args=["train.steps=7"],
    )

    assert slurm_cluster.wait(job, timeout=420) == "COMPLETED", log.read_text()
    signalled = _events(out, "signal", 0)
    assert [e["signal"] for e in signalled] == ["SIGUSR1"], log.read_text()
    assert int(slurm_cluster.job(job)["Restarts"]) >= 1
    assert (out / "complete").exists()
    argv = _events(out, "started", 0)[0]["argv"]
    assert argv == [
        "--config",
        "pretrain/configs/base.yaml",
        f"train.output_dir={out}",
        "data.data_dir=data/shards",
        "train.steps=7",
        "standin.wait_for_signal=190",
    ]


def test_failed_training_is_not_requeued(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """A program that fails ends the job FAILED; a stale `preempted` marker does not requeue it."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    out.mkdir()
    (out / "preempted").touch()
    job = slurm_cluster.submit(
        SLURM_DIR / "pretrain_large.sh",
        env=standin.script_env(out, extra="standin.wait_for_signal=1"),
        args=["-N", "2", *CPU_NODE_ARGS, f"--output={log}"],
    )

    assert slurm_cluster.wait(job, timeout=180) == "FAILED", log.read_text()
    assert slurm_cluster.job(job)["Restarts"] == "0"
    assert _events(out, "no_signal", 0), log.read_text()
    assert not (out / "preempted").exists()


def test_finetune_script_passes_the_glue_arguments(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    out, log = tmp_path / "glue", tmp_path / "job.out"
    env = {
        **standin.script_env(out),
        "TASK": "mrpc",
        "DATA_DIR": "/data/glue/mrpc",
        "PRETRAINED": "/ckpt/large",
        "DEEPSPEED_CONFIG": "/cfg/ds.json",
    }
    job = slurm_cluster.submit(
        SLURM_DIR / "finetune_glue.sh", env=env, args=[*CPU_NODE_ARGS, f"--output={log}"]
    )

    assert slurm_cluster.wait(job, timeout=180) == "COMPLETED", log.read_text()
    (started,) = _events(out, "started", 0)
    assert started["argv"] == [
        "--task",
        "mrpc",
        "--data_dir",
        "/data/glue/mrpc",
        "--pretrained",
        "/ckpt/large",
        "--output_dir",
        str(out),
        "--deepspeed_config",
        "/cfg/ds.json",
    ]
    assert (out / "complete").exists()
