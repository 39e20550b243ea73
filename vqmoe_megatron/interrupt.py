"""Ctrl-C in any command: one line on stderr and exit status 130, never a traceback.

A command calls ``guard_startup()`` first, before it imports torch & co. Until ``run`` starts its
work, SIGINT ends the process at once (nothing is open yet that needs closing). ``run(main)``
then lets SIGINT raise KeyboardInterrupt again, so that ``finally`` blocks and context managers
clean up (loader workers, process groups, staged files), and turns it into the line and 130;
further Ctrl-Cs are ignored while it exits. A SIGINT that the parent set to be ignored stays
ignored. A training loop takes Ctrl-C over while it runs (``training.trainer.StopRequest``): the
first one saves a checkpoint at the step boundary and exits 130 naming it, a second one exits 130
at once; SIGTERM and SIGUSR1 save and exit 0 (preemption).

Standard library only: importing this module must itself be instant.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn, Optional

EXIT_INTERRUPTED = 130
INTERRUPTED = "interrupted"


def _sigint_ignored() -> bool:
    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def _exit_now(signum: int, frame) -> None:
    os.write(2, f"{INTERRUPTED}\n".encode())
    os._exit(EXIT_INTERRUPTED)


def guard_startup() -> None:
    """Until ``run``: Ctrl-C exits 130 at once with one line (imports take seconds)."""
    if not _sigint_ignored():
        signal.signal(signal.SIGINT, _exit_now)


def run(main: Callable[[], Optional[int]], message: str = INTERRUPTED) -> NoReturn:
    """Exit with ``main()``'s return value (None: 0); on Ctrl-C print ``message`` and exit 130."""
    if not _sigint_ignored():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(message, file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code or 0)
