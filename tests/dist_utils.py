"""Run a test worker under torchrun with N real processes (gloo on CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
LAUNCH_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
"""Set in this pytest process by in-process ``init_distributed``; children must not inherit them."""
WORKERS_DIR = TESTS_DIR / "workers"


def free_port() -> int:
    """A free TCP port on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(extra: dict | None = None) -> dict:
    """Environment for child processes: tests/ importable, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    for name in LAUNCH_VARIABLES:
        env.pop(name, None)
    env.update(extra or {})
    return env


def torchrun_command(nproc: int) -> list[str]:
    """``python -m torch.distributed.run`` for ``nproc`` local ranks on a free port (append the
    script, or ``-m module``, and its arguments)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]


def torchrun(worker: str, nproc: int, *args: str, timeout: int = 300) -> str:
    """Run ``tests/workers/<worker>`` on ``nproc`` ranks; fail the test with the output tail."""
    cmd = [*torchrun_command(nproc), str(WORKERS_DIR / worker), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env())
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"{worker} failed (exit {proc.returncode}):\n{output[-6000:]}")
    return output
