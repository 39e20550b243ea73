"""Running the real pretraining CLI from tests (shared by the pretraining and conversion tests).

``pretrain`` runs ``pretrain/pretrain_vqmoe.py`` with the tiny config on shards, under the chosen
launcher; ``trained_run`` caches a finished run per name for the whole session, so that every
test module that needs a tiny checkpoint trains it once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

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


def command(nproc: int, launcher: str = "torchrun") -> list[str]:
    if nproc == 1 and launcher == "python":
        return [sys.executable, str(SCRIPT)]
    if launcher == "deepspeed":
        return [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(free_port()),
            str(SCRIPT),
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
            str(SCRIPT),
        ]
    return [*torchrun_command(nproc), str(SCRIPT)]


def env() -> dict:
    return child_env(
        {
            "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMPI_MCA_btl": "self,tcp",
        }
    )


def pretrain(
    shards: Path,
    out: Path,
    *extra: str,
    nproc: int = 1,
    launcher: str = "python",
    check: bool = True,
):
    """Run the CLI to completion; returns the CompletedProcess."""
    cmd = [*command(nproc, launcher), "--config", str(CONFIG), *overrides(shards, out, *extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env(), cwd=REPO)
    if check and proc.returncode != 0:
        pytest.fail(
            f"pretraining failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-5000:]}"
        )
    return proc


def records(out: Path, kind: str = "train") -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(out: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records(out)}


def trained_run(
    factory: pytest.TempPathFactory, name: str, shards: Path, *extra: str, nproc: int = 1
) -> Path:
    """A finished tiny run (``train.steps=3`` unless overridden), trained once per session."""
    out = factory.getbasetemp() / "trained_runs" / name
    if not (out / "complete").is_file():
        shutil.rmtree(out, ignore_errors=True)
        launcher = "torchrun" if nproc > 1 else "python"
        pretrain(shards, out, "train.steps=3", *extra, nproc=nproc, launcher=launcher)
    return out
