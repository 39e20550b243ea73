"""What every command prints: one ``error: ...`` line for a user's mistake, and no third-party
noise. A low layer (standard library only): any command, at any layer above, may use it."""

from __future__ import annotations

import sys
import warnings

MAX_ERROR_CHARS = 800


def quiet_third_party_warnings() -> None:
    """megatron and DeepSpeed warn about missing optional GPU packages on every import, and
    megatron's checkpoint reader and DeepSpeed's ZeRO about torch APIs they still use (e.g.
    ``all_gather_into_tensor``, once per step); none of it is actionable."""
    for pattern in (
        "Apex is not installed",
        "Transformer Engine and Apex",
        "full scope is deprecated",
        "is deprecated. Please use `torch.distributed",
    ):
        warnings.filterwarnings("ignore", message=f".*{pattern}.*")
    for module in ("megatron.core.dist_checkpointing", "torch.distributed.checkpoint"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)


def fail(message: str) -> int:
    """Print ``error: message`` to stderr as one line (long library messages are shortened) and
    return exit code 2."""
    line = " ".join(message.split())
    if len(line) > MAX_ERROR_CHARS:
        line = line[: MAX_ERROR_CHARS - 3] + "..."
    print(f"error: {line}", file=sys.stderr, flush=True)
    return 2
