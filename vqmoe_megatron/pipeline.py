"""Multi-command pipelines (``make demo``, ``vqmoe-compare``): steps that run the project's own
command lines, each skipped when its outputs exist, each logged to a file.

A :class:`Step` is what a user would type (``command``) or a little glue between tools
(``action``), plus ``done``, the test that its outputs exist. Running a pipeline again therefore
skips what finished and re-runs the rest; the training commands resume from their checkpoints.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
"""The repository root: the commands run there (``pretrain/pretrain_vqmoe.py`` and friends)."""


class StepFailed(RuntimeError):
    """A step's command could not start or ended with an error; the message names the log."""


@dataclass
class Step:
    """One pipeline stage: ``command`` (or, for glue between tools, ``action``) runs unless
    ``done`` already holds (its outputs exist)."""

    name: str
    command: list[str]
    done: Callable[[], bool]
    action: Optional[Callable[[], None]] = None


def run_logged(
    command: list[str],
    log: Path,
    echo: bool = True,
    env: Optional[Mapping[str, str]] = None,
    cwd: Path = REPO,
) -> None:
    """Run ``command`` in ``cwd`` (the repository by default), its output appended to ``log``
    (and shown live when ``echo``). On Ctrl-C the command got the same signal: wait for it to save and stop, then
    re-raise. Raises :class:`StepFailed` naming the command and the log when it fails."""
    with log.open("a", encoding="utf-8") as sink:
        sink.write(f"$ {shlex.join(command)}\n")
        sink.flush()
        try:
            proc = subprocess.Popen(
                command,
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=None if env is None else dict(env),
            )
        except OSError as exc:
            raise StepFailed(
                f"cannot start {command[0]} ({exc}); is the environment complete?"
            ) from exc
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                if echo:
                    sys.stdout.write(line)
                sink.write(line)
        except KeyboardInterrupt:
            proc.wait()
            raise
        if proc.wait() != 0:
            raise StepFailed(
                f"exit status {proc.returncode} from: {shlex.join(command)}\n(log: {log})"
            )
