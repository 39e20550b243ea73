"""Helper processes end with the process that started them, however it ends.

A run killed with SIGKILL cannot stop its helpers itself. torch's DataLoader workers notice a dead
parent only at their next status check (seconds later), and a multiprocessing pool's workers wait
on their task queue for good. :func:`end_with_parent`, called first thing in such a child, asks
Linux to SIGKILL it the moment its parent exits (``prctl(PR_SET_PDEATHSIG)``).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


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
