"""A training run killed with SIGKILL leaves no process behind: its loader workers die with it,
and a checkpoint save starts no helper process (megatron's results-queue Manager, the
multiprocessing resource tracker) that could outlive it."""

from __future__ import annotations

import signal
import subprocess
import time

import psutil
import pytest
from convert_helpers import shards
from pretrain_helpers import CONFIG, REPO, command, env, overrides, records

pytestmark = pytest.mark.slow


def test_killed_run_leaves_no_process_behind(tmp_path_factory, tmp_path):
    out = tmp_path / "run"
    args = overrides(shards(tmp_path_factory), out, "train.steps=100000", "train.save_interval=2")
    proc = subprocess.Popen(
        [*command(1, "python"), "--config", str(CONFIG), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env(),
        cwd=REPO,
    )
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.time() + 300
        while not (any(r["step"] >= 3 for r in records(out)) and parent.children()):
            assert proc.poll() is None and time.time() < deadline, "the run did not get going"
            time.sleep(0.2)
        assert (out / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
        tree = parent.children(recursive=True)
        names = [_cmdline(p) for p in tree]
        assert not any("resource_tracker" in n or "spawn_main" in n for n in names), names
        parent.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(tree, timeout=3)
        running = [p for p in alive if not _exited(p)]
        assert not running, [_cmdline(p) for p in running]
    finally:
        if proc.poll() is None:
            proc.kill()


def _exited(process: psutil.Process) -> bool:
    """Dead: gone, or a zombie nobody has reaped yet (it runs no code)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _cmdline(process: psutil.Process) -> str:
    """The command line, or a marker for a child that has exited already (a zombie its parent
    has not reaped yet, e.g. a short-lived helper command run by a library at start-up)."""
    try:
        return " ".join(process.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return f"<exited: pid {process.pid}>"
