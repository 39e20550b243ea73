"""Test stand-in for pretrain/pretrain_vqmoe.py and finetune/glue.py, for the slurm tests.

It follows the training programs' contract, with no model: one process per rank under torchrun
or the DeepSpeed launcher; a gloo all_reduce over the whole world; on SIGUSR1 or SIGTERM every
rank "saves" (sleeps, then writes ``<out>/checkpoints/rank<R>.json``), rank 0 writes
``<out>/preempted`` and all ranks exit 0; a run that finds every rank's checkpoint resumes and
completes (rank 0 writes ``<out>/complete``, removes ``preempted``).

The output directory comes from ``train.output_dir=DIR`` or ``--output_dir DIR``. Test-only
overrides: ``standin.wait_for_signal=SECONDS`` makes a fresh (not resumed) run wait that long for
a signal and fail without one; ``standin.save_seconds=SECONDS`` is how long a save takes.

Each rank appends JSON events to ``<out>/standin/rank<R>.jsonl``; the tests read those.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

received: list[str] = []


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Record the signal; the main loop saves and exits."""
    received.append(signal.Signals(signum).name)


def _log(out: Path, rank: int, event: str, **fields: object) -> None:
    """Append one event line for this rank."""
    record = {
        "event": event,
        "rank": rank,
        "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
        "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "pid": os.getpid(),
        "time": time.time(),
        **fields,
    }
    (out / "standin").mkdir(parents=True, exist_ok=True)
    with open(out / "standin" / f"rank{rank}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _parse(argv: list[str]) -> tuple[Path, dict[str, str]]:
    """Return the output directory and the ``section.key=value`` overrides."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir")
    _known, rest = parser.parse_known_args(argv)
    overrides = dict(arg.split("=", 1) for arg in rest if "=" in arg and not arg.startswith("-"))
    out = _known.output_dir or overrides.get("train.output_dir")
    if not out:
        parser.error("no output directory: pass --output_dir or train.output_dir=DIR")
    return Path(out), overrides


def script_env(output_dir: Path, extra: str = "") -> dict[str, str]:
    """Environment that makes the slurm/ sbatch scripts run this stand-in into ``output_dir``."""
    return {
        "PROGRAM": str(Path(__file__).resolve()),
        "PYTHON": sys.executable,
        "OUTPUT_DIR": str(output_dir),
        "EXTRA": extra,
        # Every node of the local test cluster is this host: let gloo use the loopback device
        # instead of whatever address the host name resolves to.
        "GLOO_SOCKET_IFNAME": "lo",
    }


def read_events(output_dir: Path) -> list[dict[str, object]]:
    """Every rank's events, in time order."""
    lines = [
        json.loads(line)
        for path in sorted((output_dir / "standin").glob("rank*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    return sorted(lines, key=lambda e: e["time"])


def main(argv: list[str]) -> int:
    """Run one rank; return the exit code."""
    out, overrides = _parse(argv)
    inherited_usr1 = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    checkpoints = out / "checkpoints"
    resumed = all((checkpoints / f"rank{r}.json").exists() for r in range(world))
    _log(
        out,
        rank,
        "started",
        argv=argv,
        world_size=world,
        all_reduce_sum=total.item(),
        resumed=resumed,
        inherited_usr1=getattr(inherited_usr1, "name", str(inherited_usr1)),
    )

    wait = 0.0 if resumed else float(overrides.get("standin.wait_for_signal", "0"))
    deadline = time.monotonic() + wait
    while wait and not received and time.monotonic() < deadline:
        time.sleep(0.1)
    if wait and not received:
        _log(out, rank, "no_signal")
        return 3

    if received:
        _log(out, rank, "signal", signal=received[0])
        time.sleep(float(overrides.get("standin.save_seconds", "3")))
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / f"rank{rank}.json").write_text(json.dumps({"signal": received[0]}))
        dist.barrier()
        if rank == 0:
            (out / "preempted").touch()
        _log(out, rank, "saved")
    else:
        dist.barrier()
        if rank == 0:
            (out / "complete").touch()
            (out / "preempted").unlink(missing_ok=True)
        _log(out, rank, "complete")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
