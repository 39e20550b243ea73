"""slurm/shard_corpus.sh on the local 2-node slurm cluster: an array job of shard.py parts and
its merge job give shards byte-identical to the single-machine data_tools/shard.py; a missing
part fails the merge with the command that re-runs it, and re-running the array verifies the
finished parts instead of redoing them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from data_helpers import FIXTURE, shard_settings, tiny_shards
from slurm_cluster import CPU_NODE_ARGS, SlurmCluster, program_env

from vqmoe_megatron.data.shard_parts import PARTS_DIR

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
PARTS = 3


def _shard_args(factory: pytest.TempPathFactory, output: Path) -> list[str]:
    """shard.py arguments with the settings of tiny_shards (workers aside)."""
    s = shard_settings(factory, output)
    return [
        str(FIXTURE),
        f"--tokenizer={s.tokenizer}",
        f"--output={output}",
        f"--seq-length={s.seq_length}",
        f"--valid-fraction={s.valid_fraction}",
        f"--shard-size-mb={s.shard_size_mb}",
    ]


def _submit(cluster: SlurmCluster, args: list[str], logs: Path, array: str, **env: str) -> str:
    return cluster.submit(
        REPO / "slurm" / "shard_corpus.sh",
        env=program_env(REPO, **env),
        args=[f"--array={array}", *CPU_NODE_ARGS, f"--output={logs}/shard-%A_%a.out"],
        script_args=args,
    )


def _run_array(cluster: SlurmCluster, job: str, tasks: list[int], logs: Path) -> str:
    """Wait for the array's tasks; return the merge job id the first task submitted."""
    for task in tasks:
        state = cluster.wait(f"{job}_{task}", timeout=300)
        assert state == "COMPLETED", (logs / f"shard-{job}_{task}.out").read_text()
    first = (logs / f"shard-{job}_{tasks[0]}.out").read_text()
    found = re.search(rf"merge job (\d+) starts when array job {job} succeeded", first)
    assert found, first
    return found[1]


def test_array_job_and_merge_give_the_single_machine_shards(
    slurm_cluster: SlurmCluster, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
):
    single = tiny_shards(tmp_path_factory, "main")
    out, logs = tmp_path / "shards", tmp_path / "logs"
    logs.mkdir()
    args = _shard_args(tmp_path_factory, out)

    # Part 1 never runs (as if its task had failed): the merge names it and how to re-run it.
    job = _submit(slurm_cluster, args, logs, "0,2", PARTS=str(PARTS))
    merge = _run_array(slurm_cluster, job, [0, 2], logs)
    merge_log = logs / f"vqmoe-shard-merge-{merge}.out"
    assert slurm_cluster.wait(merge, timeout=300) == "FAILED", merge_log.read_text()
    assert f"error: parts 1 of {PARTS} under {out / PARTS_DIR} are missing" in merge_log.read_text()
    assert f"PARTS={PARTS} sbatch --array=1 slurm/shard_corpus.sh" in merge_log.read_text()
    assert not (out / "manifest.json").exists()

    # The whole array again: parts 0 and 2 are verified, part 1 is tokenized, the merge runs.
    job = _submit(slurm_cluster, args, logs, f"0-{PARTS - 1}")
    merge = _run_array(slurm_cluster, job, list(range(PARTS)), logs)
    merge_log = logs / f"vqmoe-shard-merge-{merge}.out"
    assert slurm_cluster.wait(merge, timeout=300) == "COMPLETED", merge_log.read_text()
    for task, redone in ((0, False), (1, True), (2, False)):
        text = (logs / f"shard-{job}_{task}.out").read_text()
        assert (f"part {task} of {PARTS} is finished (verified)" in text) != redone, text
    assert f"merged {PARTS} parts" in merge_log.read_text()

    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in single.iterdir())  # no .parts left behind
    for name in names:
        if name.endswith(".tar"):
            assert (out / name).read_bytes() == (single / name).read_bytes(), name
    ours, reference = (json.loads((d / "manifest.json").read_text()) for d in (out, single))
    assert {k for k in ours if ours[k] != reference[k]} == {"created", "settings"}
