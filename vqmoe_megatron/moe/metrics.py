"""Per-layer routing metrics, accumulated on device between log steps.

Routers call :func:`record` with small tensors (sums and counts) during the forward pass; nothing
is copied to the host there. :func:`summarize` all-reduces the sums over the ranks that route
different tokens (the whole world when pipeline parallelism is 1 and sequence parallelism is on
whenever TP > 1), derives the reported statistics and clears the accumulators.

Reported per layer (keys of the returned dicts):
- ``tokens``: routed tokens; ``rows_per_token``: expert rows per token (1 discrete, ~2 pretrain);
- ``imbalance``: max / mean rows per expert (1.0 is perfectly balanced);
- ``expert_load``: each expert's share of the rows (a list; sums to 1);
- ``router_entropy``: mean entropy (nats) of the router's softmax over all experts;
- ``code_perplexity``: exp(entropy of code usage); ``K`` when all codes are used uniformly;
- ``dead_codes``: codes with no token in the window;
- ``agreement``: fraction of tokens whose router top-1 expert is the VQ expert;
- ``gate_discrete``: mean weight g_d of the discrete path;
- ``vq_loss``: mean VQ loss per micro-batch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional, Union

import torch
import torch.distributed as dist

_SUMS: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
_ENABLED = True


def set_enabled(enabled: bool) -> None:
    """Turn recording on or off (off: :func:`record` is a no-op)."""
    global _ENABLED
    _ENABLED = enabled


def enabled() -> bool:
    """Whether metrics are being recorded (routers skip their bookkeeping otherwise)."""
    return _ENABLED


def record(layer: Optional[int], name: str, value: torch.Tensor) -> None:
    """Add ``value`` (a detached scalar or vector) to the layer's running sum ``name``."""
    if not _ENABLED or layer is None:
        return
    value = value.detach().to(torch.float64)
    sums = _SUMS[layer]
    if name in sums:
        sums[name] += value
    else:
        sums[name] = value.clone()


def reset() -> None:
    """Drop every accumulated sum."""
    _SUMS.clear()


def _entropy(counts: torch.Tensor) -> float:
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts / total
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def summarize(
    group: Optional[dist.ProcessGroup] = None,
) -> dict[int, dict[str, Union[float, list[float]]]]:
    """Reduce the sums over ``group`` (default: world), derive the metrics, clear the sums.

    Every rank must call this at the same time (it is a collective when distributed).
    """
    layers = sorted(_SUMS)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        for layer in layers:
            for name in sorted(_SUMS[layer]):
                dist.all_reduce(_SUMS[layer][name], group=group)
    out: dict[int, dict[str, Union[float, list[float]]]] = {}
    for layer in layers:
        s = {k: v.cpu() for k, v in _SUMS[layer].items()}
        tokens = float(s.get("tokens", torch.tensor(0.0)))
        stats: dict[str, Union[float, list[float]]] = {"tokens": tokens}
        if "expert_rows" in s:
            rows = s["expert_rows"]
            stats["rows_per_token"] = float(rows.sum()) / max(tokens, 1.0)
            mean = float(rows.mean())
            stats["imbalance"] = float(rows.max()) / mean if mean > 0 else 0.0
            stats["expert_load"] = (rows / rows.sum().clamp(min=1)).tolist()
        if "code_counts" in s:
            counts = s["code_counts"]
            stats["code_perplexity"] = math.exp(_entropy(counts))
            stats["dead_codes"] = float((counts == 0).sum())
        for name, key in (
            ("router_entropy", "router_entropy_sum"),
            ("agreement", "agreement_sum"),
            ("gate_discrete", "gate_discrete_sum"),
        ):
            if key in s and tokens > 0:
                stats[name] = float(s[key]) / tokens
        if "vq_loss_sum" in s:
            stats["vq_loss"] = float(s["vq_loss_sum"]) / max(float(s["micro_batches"]), 1.0)
        out[layer] = stats
    reset()
    return out
