"""``bench/gpu_check.sh --dry-run``: the CPU-checkable part of the GPU check (its configs load
with the one-GPU overrides and every row it asks ``bench/pretrain_throughput.py`` for exists).
The GPU run itself needs a GPU and is not tested here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # three Python start-ups that import megatron and DeepSpeed: ~40 s on 2 cores
def test_gpu_check_dry_run_asks_for_existing_rows_of_both_configs():
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line for line in lines if line.startswith("== ")] == [
        "== pretrain/configs/base.yaml",
        "== pretrain/configs/large.yaml",
    ]
    assert lines.count("vqmoe pretrain (top-1 + VQ, grouped)") == 2
    assert lines.count("megatron top-2") == 2
    bad = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--fast"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown argument '--fast'")
