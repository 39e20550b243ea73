"""slurm/finetune_glue.sh with the real fine-tuning program on the local 2-node slurm cluster.

2 nodes x 1 rank (world 2, expert parallel 2, ZeRO-2 over gloo) fine-tune the tiny pretrained
model on an SST-2-format task; `scancel --signal=USR1` (what `--signal=USR1@secs` sends)
preempts the run while it trains; the ranks save, the job requeues itself, and the next run
resumes from that checkpoint and finishes with the results, the submission file and `complete`.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
from convert_helpers import run_of
from finetune_helpers import sentence_task
from pretrain_helpers import REPO, records
from slurm_cluster import CPU_NODE_ARGS, SlurmCluster, program_env, read_marker

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STEPS = 200


def test_usr1_preempts_fine_tuning_and_the_requeued_job_finishes(
    slurm_cluster: SlurmCluster, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pretrained = run_of(tmp_path_factory, "ep1_zero1")
    data = sentence_task(tmp_path / "glue", train=400, dev=40)
    out, log = tmp_path / "run", tmp_path / "job.out"
    env = program_env(
        REPO,
        TASK="sst2",
        DATA_DIR=str(data),
        PRETRAINED=str(pretrained),
        OUTPUT_DIR=str(out),
        EXTRA=f"--steps {STEPS} --micro_batch_size 4 parallel.expert_parallel=2 "
        "train.log_interval=1",
    )
    job = slurm_cluster.submit(
        REPO / "slurm" / "finetune_glue.sh",
        env=env,
        args=["-N", "2", *CPU_NODE_ARGS, f"--output={log}"],
    )
    slurm_cluster.while_running(job, lambda: len(records(out)) >= 3 or None)
    slurm_cluster.signal(job, "USR1")
    stopped = slurm_cluster.while_running(job, lambda: read_marker(out / "preempted"))
    assert slurm_cluster.wait(job, timeout=900) == "COMPLETED", log.read_text()

    text = log.read_text()
    found = re.fullmatch(rf"step (\d+) signal {int(signal.SIGUSR1)}\n", stopped)
    assert found, stopped
    step = int(found[1])
    assert 3 <= step < STEPS, text
    assert slurm_cluster.job(job)["Restarts"] == "1"
    assert text.count("launch ended with status 0") == 2, text
    assert "0: [vqmoe] layout: world 2 = TP 1 x DP 2 (EP 2 x expert-DP 1)" in text, text
    assert f"0: [vqmoe] resumed from {out / 'checkpoints' / f'step_{step:08d}'} at step" in text
    assert [r["step"] for r in records(out)] == list(range(1, STEPS + 1))
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == STEPS and results["task"] == "SST-2"
    assert (out / "predictions" / "SST-2.tsv").is_file()
    assert (out / "complete").read_text() == f"{STEPS}\n"
    assert not (out / "preempted").exists()
