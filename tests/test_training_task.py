"""A third kind of training run needs a ``Task`` subclass only: the one training loop drives a
task that no other code knows (``tests/workers/parity_task.py``) through its steps, metrics,
evaluation, checkpoints and a resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from dist_utils import child_env
from pretrain_helpers import records

from vqmoe_megatron.checkpoint.training import find_latest

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "workers" / "parity_task.py"


def _run(out: Path, steps: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(WORKER), "--out", str(out), "--steps", str(steps)],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


@pytest.mark.slow  # two tiny training runs (~25 s on a 2-core box)
def test_a_task_class_is_all_a_new_kind_of_run_needs(tmp_path: Path):
    out = tmp_path / "run"
    _run(out, 4)
    train = records(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "accuracy", "lr", "grad_norm", "step_time_s", "layer1/rows_per_token"):
        assert key in train[-1], key
    (evaluation,) = records(out, "eval")
    assert evaluation["step"] == 4 and 0 <= evaluation["accuracy"] <= 1
    assert find_latest(out / "checkpoints").name == "step_00000004"
    assert (out / "complete").read_text() == "4\n"
    rerun = _run(out, 6)
    assert "resumed from" in rerun.stdout and "at step 4" in rerun.stdout
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5, 6]
    assert (out / "complete").read_text() == "6\n"
