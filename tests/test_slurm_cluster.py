"""The local slurm cluster works, and so does the scripts' multi-node launch pattern on it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import slurm_standin_train as standin
from slurm_cluster import CPU_NODE_ARGS, NODES, SlurmCluster

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[1]


def test_two_node_job_gets_one_task_per_node(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        "srun bash -c 'echo task procid=$SLURM_PROCID nodeid=$SLURM_NODEID node=$SLURMD_NODENAME'\n"
    )
    log = tmp_path / "job.out"
    job = slurm_cluster.submit(script, args=["-N", "2", "--ntasks-per-node=1", f"--output={log}"])

    assert slurm_cluster.wait(job, timeout=120) == "COMPLETED", log.read_text()
    tasks = sorted(re.findall(r"task procid=(\d) nodeid=(\d) node=(\w+)", log.read_text()))
    assert tasks == [("0", "0", NODES[0]), ("1", "1", NODES[1])]


def test_pretrain_script_all_reduce_across_two_nodes(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """slurm/pretrain_large.sh: one srun task per node runs torchrun; gloo all_reduce spans both."""
    out = tmp_path / "run"
    log = tmp_path / "job.out"
    job = slurm_cluster.submit(
        REPO / "slurm" / "pretrain_large.sh",
        env=standin.script_env(out),
        args=["-N", "2", *CPU_NODE_ARGS, f"--output={log}"],
    )

    assert slurm_cluster.wait(job, timeout=180) == "COMPLETED", log.read_text()
    started = [e for e in standin.read_events(out) if e["event"] == "started"]
    assert sorted((e["rank"], e["node"]) for e in started) == [(0, NODES[0]), (1, NODES[1])]
    assert all(e["world_size"] == 2 and e["all_reduce_sum"] == 3.0 for e in started)
    assert (out / "complete").exists()
