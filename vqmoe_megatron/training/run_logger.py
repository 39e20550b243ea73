"""Run logging: console lines on rank 0, ``metrics.jsonl`` and TensorBoard scalars."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from vqmoe_megatron.config import ConfigError


def format_duration(seconds: float) -> str:
    """``3725`` -> ``1h02m05s``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def make_output_dir(path: Path) -> None:
    """Create a run directory; one that cannot be created (a file is in the way, a read-only
    file system) is a ConfigError naming ``train.output_dir``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"train.output_dir={path} cannot be created ({exc.strerror}: {exc.filename}); "
            "choose a writable directory"
        ) from exc


class RunLogger:
    """Writes what rank 0 reports; other ranks' calls are no-ops."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.start = time.time()
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def info(self, message: str) -> None:
        """A plain log line (rank 0)."""
        if self.enabled:
            print(f"[vqmoe] {message}", flush=True)

    def warning(self, message: str) -> None:
        """A warning line (rank 0, stderr)."""
        if self.enabled:
            print(f"[vqmoe] WARNING: {message}", file=sys.stderr, flush=True)

    def scalars(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        """One JSON line and TensorBoard scalars ``<kind>/<name>``."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time() - self.start, 3), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        """Flush and close the files."""
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def progress_line(
    step: int, total: int, values: dict[str, Optional[float]], elapsed: float, done_steps: int
) -> str:
    """``step 10/100 (10%) | loss 3.2100 | ... | ETA 1m30s``."""
    parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, float) and (abs(value) >= 1e4 or (0 < abs(value) < 1e-3)):
            parts.append(f"{name} {value:.3e}")
        elif isinstance(value, float):
            parts.append(f"{name} {value:.4f}")
        else:
            parts.append(f"{name} {value}")
    rate = done_steps / elapsed if elapsed > 0 else 0.0
    eta = (total - step) / rate if rate > 0 else float("inf")
    parts.append(f"ETA {format_duration(eta)}")
    return " | ".join(parts)
