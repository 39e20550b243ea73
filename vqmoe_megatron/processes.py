"""Helper processes end with the process that started them, however it ends.

A run killed with SIGKILL cannot stop its helpers itself. torch's DataLoader workers notice a dead
parent only at their next status check (seconds later), and a multiprocessing pool's workers wait
on their task queue for good. :func:`end_with_parent`, called first thing in such a child, asks
Linux to SIGKILL it the moment its parent exits (``prctl(PR_SET_PDEATHSIG)``).
:func:`end_forked_children_with_this_process` makes the same request for every child the process
forks, right after the fork and before any code of the child runs: a child that blocks before
its first line (on a lock another thread of the parent held at the fork) still dies with it.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
_forking_parent: list[int] = []
"""The pid of the process forking, set by the at-fork hook (empty: the hook is not registered)."""


def end_with_parent() -> None:
    """Have this multiprocessing child killed when its parent process exits (Linux; elsewhere a
    no-op). Exits at once when the parent is already gone."""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != parent.pid:  # the parent died before the prctl took effect
        os._exit(1)


def end_forked_children_with_this_process() -> None:
    """From now on, every child this process forks (DataLoader workers, pool workers) is killed
    when this process exits, however that happens (Linux; elsewhere a no-op). Idempotent."""
    if _forking_parent or not sys.platform.startswith("linux"):
        return
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved now, not in the forked child

    def before_fork() -> None:
        _forking_parent[0] = os.getpid()

    def in_child() -> None:
        asked = prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        if asked and os.getppid() != _forking_parent[0]:  # the parent died before the prctl
            os._exit(1)

    _forking_parent.append(os.getpid())
    os.register_at_fork(before=before_fork, after_in_child=in_child)
