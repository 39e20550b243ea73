"""Running a comparison: claim its directories, run every unit's steps (``jobs`` units at a
time), show progress with an ETA, and stop cleanly on a failure or Ctrl-C.

A unit's steps run in order; units run side by side in worker threads, each step a subprocess
whose output goes to ``<workdir>/logs/<variant>_seed<s>_<step>.log``. With ``jobs`` > 1 every
command gets ``OMP_NUM_THREADS = cores // jobs`` (unless the caller set it), so side-by-side runs
do not oversubscribe the CPU. Steps whose outputs exist are skipped, and pretraining and
fine-tuning resume from their checkpoints, so the same command continues an interrupted
comparison.
"""

from __future__ import annotations

import os
import re
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

import yaml

from vqmoe_megatron.compare.plan import CompareSettings, Unit
from vqmoe_megatron.pipeline import StepFailed, run_logged


class CompareError(RuntimeError):
    """A comparison that cannot start or go on; the message says why and what to do."""


SETTINGS_FILE = "compare.yaml"


def claim(settings: CompareSettings, out: Path, workdir: Path) -> None:
    """Write the settings to ``<out>/compare.yaml`` (and the work directory), or refuse a
    directory holding a comparison made with other settings: its finished runs would be
    reused for numbers they were not made with."""
    record = {"settings": asdict(settings), "workdir": str(workdir)}
    for folder in (out, workdir):
        path = folder / SETTINGS_FILE
        if path.is_file():
            before = yaml.safe_load(path.read_text(encoding="utf-8"))["settings"]
            changed = sorted(k for k in record["settings"] if before.get(k) != getattr(settings, k))
            if changed:
                diff = "; ".join(f"{k}: {before.get(k)} -> {getattr(settings, k)}" for k in changed)
                raise CompareError(
                    f"{path} holds a comparison made with other settings ({diff}); give another "
                    f"--out (and --workdir), or the same settings to resume it"
                )
    for folder in (out, workdir):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SETTINGS_FILE).write_text(yaml.safe_dump(record, sort_keys=False), "utf-8")


def thread_env(jobs: int) -> dict[str, str]:
    """The environment of every command: OMP threads split between ``jobs`` side-by-side runs."""
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


class Progress:
    """Counts finished steps and prints one line per step with the elapsed time and an ETA
    (the mean time of the steps run so far times the steps left)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.ran = total, 0, 0
        self.started = time.time()
        self.lock = threading.Lock()

    def finished(self, unit: Unit, step: str, seconds: float, skipped: bool) -> None:
        with self.lock:
            self.done += 1
            self.ran += 0 if skipped else 1
            left = self.total - self.done
            elapsed = time.time() - self.started
            eta = "" if not self.ran else f" | ETA {_minutes(elapsed / self.ran * left)}"
            what = "done already" if skipped else f"{seconds:.0f} s"
            print(
                f"[compare {self.done}/{self.total}] {unit.title}: {step}: {what}{eta}", flush=True
            )


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def run_units(units: list[Unit], workdir: Path, jobs: int) -> None:
    """Run every unit's steps, ``jobs`` units at a time. The first failure stops new steps
    from starting; the running ones finish, then :class:`CompareError` names the failed command
    and its log. Ctrl-C reaches the running commands too (same process group): they save and
    stop, and KeyboardInterrupt propagates."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    progress = Progress(sum(len(u.steps) for u in units))
    stop = threading.Event()
    env = thread_env(jobs)

    def run_steps(unit: Unit) -> None:
        for step in unit.steps:
            if step.done():
                progress.finished(unit, step.name, 0.0, skipped=True)
                continue
            if stop.is_set():
                return
            name = re.sub(r"[^a-z0-9]+", "_", f"{unit.variant.name}_seed{unit.seed}_{step.name}")
            log = logs / f"{name.strip('_')}.log"
            began = time.time()
            run_logged(step.command, log, echo=False, env=env, cwd=Path.cwd())
            if not step.done():
                raise CompareError(
                    f"{unit.title}: {step.name} ended but its outputs are missing; see {log}"
                )
            progress.finished(unit, step.name, time.time() - began, skipped=False)

    def run_unit(unit: Unit) -> None:
        try:
            run_steps(unit)
        except BaseException:
            stop.set()
            raise

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(run_unit, unit) for unit in units]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        except KeyboardInterrupt:
            stop.set()
            raise
    for future in futures:
        error = future.exception()
        if isinstance(error, StepFailed):
            raise CompareError(str(error)) from error
        if error is not None:
            raise error
