"""Forked children die with their parent even when they never run a line of their own: a
DataLoader worker that blocks right after the fork (on a lock another thread of the parent held
at that moment) must not outlive a killed run."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

PARENT = textwrap.dedent(
    """
    import os, sys, threading, time
    from vqmoe_megatron.processes import end_forked_children_with_this_process
    if sys.argv[1] == "register":
        end_forked_children_with_this_process()
    held = threading.Lock()
    held.acquire()  # the child inherits it taken, as a lock held by another thread at the fork
    pid = os.fork()
    if pid == 0:
        held.acquire()  # blocks for good: the child never reaches code that could clean up
        os._exit(0)
    print(pid, flush=True)
    time.sleep(600)
    """
)


def _child_after_parent_killed(register: bool) -> psutil.Process:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, "register" if register else "plain"],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = psutil.Process(int(parent.stdout.readline()))
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    return child


def _gone(process: psutil.Process, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG)")
def test_a_forked_child_blocked_from_its_start_dies_with_its_killed_parent():
    child = _child_after_parent_killed(register=True)
    assert _gone(child, timeout=5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG)")
def test_without_the_hook_such_a_child_outlives_its_parent():
    """The case the hook exists for (so the test above can fail)."""
    child = _child_after_parent_killed(register=False)
    try:
        assert not _gone(child, timeout=1)
    finally:
        child.kill()
