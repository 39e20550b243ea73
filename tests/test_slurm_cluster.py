"""The local slurm cluster works."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from slurm_cluster import NODES, SlurmCluster

pytestmark = pytest.mark.slurm


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
