"""Running the real training programs from tests (shared by the pretraining, conversion and
fine-tuning tests).

``run_program`` starts a script (``pretrain/pretrain_vqmoe.py``, ``finetune/glue.py``) under the
chosen launcher as a user would; ``pretrain`` runs pretraining with the tiny config on shards;
``trained_run`` caches a finished run per name for the whole session, so that every test module
that needs a tiny checkpoint trains it once; ``run_and_signal_one_rank`` preempts a run;
``records`` reads back what a run logged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from dist_utils import child_env, free_port, torchrun_command

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "pretrain" / "pretrain_vqmoe.py"
CONFIG = REPO / "pretrain" / "configs" / "tiny.yaml"


def overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.data_dir={shards}",
        f"train.output_dir={out}",
        "train.tensorboard=false",
        "train.eval_interval=0",
        "train.log_interval=1",
        "train.save_interval=1000",
        *extra,
    ]


def command(nproc: int, launcher: str = "torchrun", script: Path = SCRIPT) -> list[str]:
    """The command line that starts ``script`` on ``nproc`` local processes."""
    if nproc == 1 and launcher == "python":
        return [sys.executable, str(script)]
    if launcher == "deepspeed":
        return [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(free_port()),
            str(script),
        ]
    if launcher == "mpirun":
        return [
            shutil.which("mpirun") or "mpirun",
            "-np",
            str(nproc),
            "--oversubscribe",
            "-x",
            "PYTHONPATH",
            sys.executable,
            str(script),
        ]
    return [*torchrun_command(nproc), str(script)]


def env() -> dict:
    return child_env(
        {
            "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMPI_MCA_btl": "self,tcp",
        }
    )


def run_program(
    script: Path, args: list[str], *, nproc: int = 1, launcher: str = "python", check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``script args`` to completion; a failure (when ``check``) fails the test with the
    output's tail."""
    cmd = [*command(nproc, launcher, script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env(), cwd=REPO)
    if check and proc.returncode != 0:
        pytest.fail(
            f"{script.name} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-5000:]}"
        )
    return proc


def pretrain(
    shards: Path,
    out: Path,
    *extra: str,
    nproc: int = 1,
    launcher: str = "python",
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run the pretraining CLI (tiny config) to completion."""
    args = ["--config", str(CONFIG), *overrides(shards, out, *extra)]
    return run_program(SCRIPT, args, nproc=nproc, launcher=launcher, check=check)


def records(out: Path, kind: str = "train") -> list[dict]:
    """The ``kind`` records ("train" or "eval") of a run's metrics.jsonl, in file order; none
    before the file exists, and a line rank 0 is still writing is left out."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(out: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records(out)}


def resumed_like_uninterrupted(
    shards: Path, tmp_path: Path, steps: int, stop: int, *extra: str
) -> subprocess.CompletedProcess:
    """Train ``steps`` steps in one go (``tmp_path/a``) and in two runs stopped after ``stop``
    (``tmp_path/b``); check that the second run resumed at ``stop`` and that every step's loss
    and gradient norm equal the uninterrupted run's. Returns the resumed run's process."""
    pretrain(shards, tmp_path / "a", f"train.steps={steps}", *extra)
    pretrain(shards, tmp_path / "b", f"train.steps={stop}", *extra)
    proc = pretrain(shards, tmp_path / "b", f"train.steps={steps}", *extra)
    assert "resumed from" in proc.stdout and f"at step {stop}" in proc.stdout
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    return proc


def trained_run(
    factory: pytest.TempPathFactory, name: str, shards: Path, *extra: str, nproc: int = 1
) -> Path:
    """A finished tiny run (``train.steps=3`` unless overridden), trained once per session per
    (``name``, settings): two tests asking for one name with other settings get two runs."""
    settings = hashlib.sha256(repr((str(shards), extra, nproc)).encode()).hexdigest()[:10]
    out = factory.getbasetemp() / "trained_runs" / f"{name}-{settings}"
    if not (out / "complete").is_file():
        shutil.rmtree(out, ignore_errors=True)
        launcher = "torchrun" if nproc > 1 else "python"
        pretrain(shards, out, "train.steps=3", *extra, nproc=nproc, launcher=launcher)
    return out


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until the run writing ``out/metrics.jsonl`` has logged ``step``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"run ended before step {step}: {proc.stdout.read()[-3000:]}")
        if any(r["step"] >= step for r in records(out)):
            return
        time.sleep(0.1)
    pytest.fail(f"step {step} not reached in {timeout} s")


def run_and_signal_one_rank(
    script: Path, args: list[str], out: Path, after_step: int, nproc: int = 2
) -> tuple[int, str]:
    """Run ``script`` under torchrun and SIGTERM its last rank once ``after_step`` is logged
    (as a node-local preemption would: the ranks agree on the stop at the next step boundary).
    Returns the exit code and the output."""
    cmd = [*command(nproc, "torchrun", script), *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=REPO
    )
    try:
        wait_for_step(out, after_step, proc)
        ranks = [
            c for c in psutil.Process(proc.pid).children() if str(script) in " ".join(c.cmdline())
        ]
        assert len(ranks) == nproc
        ranks[-1].send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, output
