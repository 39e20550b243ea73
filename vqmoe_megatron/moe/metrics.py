"""Per-layer routing metrics of one model, accumulated on device between log steps.

A :class:`RoutingMetrics` collector belongs to one model: every router builds one, and
``VQMoEGPTModel`` replaces them with one collector of its own (:func:`attach`), so two models in
one process (a comparison, a teacher) never mix their numbers; a layer built on its own keeps
its router's. Recording is on by default; :meth:`RoutingMetrics.paused` (or :func:`paused` on any
module holding routers, e.g. a DeepSpeed engine) switches it off for evaluation. Routers call
:meth:`RoutingMetrics.record` with small tensors (sums and counts) during the forward pass;
nothing is copied to the host there. :meth:`RoutingMetrics.summarize` all-reduces the sums over
the ranks that route different tokens (the whole world when pipeline parallelism is 1 and
sequence parallelism is on whenever TP > 1), derives the reported statistics and clears the
sums.

Reported per layer (keys of the returned dicts):
- ``tokens``: routed tokens; ``rows_per_token``: expert rows per token (1 discrete, ~2 pretrain);
- ``imbalance``: max / mean rows per expert (1.0 is perfectly balanced);
- ``expert_load``: each expert's share of the rows (a list; sums to 1);
- ``dead_experts``: experts that received no row in the window;
- ``router_entropy``: mean entropy (nats) of the router's softmax over all experts (routers
  with logits: vqmoe's continuous router, topk, xmoe, smoe_dropout, and stablemoe's routing
  scores of its current stage; not hash, whose table has no scores);
- ``code_perplexity``: exp(entropy of code usage); ``K`` when all codes are used uniformly;
- ``dead_codes``: codes with no token in the window;
- ``agreement``: fraction of tokens whose router top-1 expert is the VQ expert;
- ``gate_discrete``: mean weight g_d of the discrete path;
- ``vq_loss``: mean VQ loss per micro-batch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

LayerStats = dict[str, Union[float, list[float]]]


class RoutingMetrics:
    """Running per-layer sums of one model's routers; ``enabled`` False makes recording a no-op."""

    def __init__(self) -> None:
        self.enabled = True
        self._sums: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)

    def record(self, layer: Optional[int], name: str, value: torch.Tensor) -> None:
        """Add ``value`` (a detached scalar or vector) to the layer's running sum ``name``."""
        if not self.enabled or layer is None:
            return
        value = value.detach().to(torch.float64)
        sums = self._sums[layer]
        if name in sums:
            sums[name] += value
        else:
            sums[name] = value.clone()

    def reset(self) -> None:
        """Drop every accumulated sum."""
        self._sums.clear()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside the block (evaluation, filler batches); restores the old state."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def summarize(self, group: Optional[dist.ProcessGroup] = None) -> dict[int, LayerStats]:
        """Reduce the sums over ``group`` (default: world), derive the metrics, clear the sums.

        Every rank must call this at the same time (it is a collective when distributed).
        """
        layers = sorted(self._sums)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            for layer in layers:
                for name in sorted(self._sums[layer]):
                    dist.all_reduce(self._sums[layer][name], group=group)
        out = {layer: _layer_stats(self._sums[layer]) for layer in layers}
        self.reset()
        return out


def attach(module: nn.Module, collector: RoutingMetrics) -> RoutingMetrics:
    """Make every router inside ``module`` (and ``module`` itself, if it holds a collector)
    record into ``collector``; returns it."""
    for child in module.modules():
        if isinstance(getattr(child, "routing_metrics", None), RoutingMetrics):
            child.routing_metrics = collector
    return collector


def collectors(module: nn.Module) -> list[RoutingMetrics]:
    """The distinct collectors the routers inside ``module`` record into (model order)."""
    found: dict[int, RoutingMetrics] = {}
    for child in module.modules():
        collector = getattr(child, "routing_metrics", None)
        if isinstance(collector, RoutingMetrics):
            found.setdefault(id(collector), collector)
    return list(found.values())


@contextmanager
def paused(module: nn.Module) -> Iterator[None]:
    """Pause every collector inside ``module`` (a model, a DeepSpeed engine, a task head)."""
    with ExitStack() as stack:
        for collector in collectors(module):
            stack.enter_context(collector.paused())
        yield


@torch.no_grad()
def record_assignment(
    metrics: RoutingMetrics,
    layer: Optional[int],
    routing_map: torch.Tensor,
    padding_mask: Optional[torch.Tensor] = None,
) -> None:
    """Record the tokens and expert rows of one routing decision of a single-stream router.

    ``routing_map`` [T, E] bool; ``padding_mask`` [S, B] (T = S * B) with True = padding, or
    None. Padding tokens are not counted.
    """
    if layer is None or not metrics.enabled:
        return
    if padding_mask is not None:
        routing_map = routing_map[~padding_mask.reshape(-1)]
    metrics.record(layer, "tokens", torch.tensor(routing_map.shape[0], device=routing_map.device))
    metrics.record(layer, "expert_rows", routing_map.sum(dim=0))


@torch.no_grad()
def record_entropy(
    metrics: RoutingMetrics,
    layer: Optional[int],
    logits: torch.Tensor,
    padding_mask: Optional[torch.Tensor] = None,
) -> None:
    """Add the entropy (nats) of ``softmax(logits)`` [..., E] of every non-padding token
    (``padding_mask`` True = padding, same leading shape) to ``router_entropy_sum``."""
    if layer is None or not metrics.enabled:
        return
    logp = torch.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    if padding_mask is not None:
        entropy = entropy[~padding_mask.reshape(-1)]
    metrics.record(layer, "router_entropy_sum", entropy.sum())


def _entropy(counts: torch.Tensor) -> float:
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts / total
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def _layer_stats(sums: dict[str, torch.Tensor]) -> LayerStats:
    """The reported statistics of one layer's (reduced) sums."""
    s = {k: v.cpu() for k, v in sums.items()}
    tokens = float(s.get("tokens", torch.tensor(0.0)))
    stats: LayerStats = {"tokens": tokens}
    if "expert_rows" in s:
        rows = s["expert_rows"]
        stats["rows_per_token"] = float(rows.sum()) / max(tokens, 1.0)
        mean = float(rows.mean())
        stats["imbalance"] = float(rows.max()) / mean if mean > 0 else 0.0
        stats["expert_load"] = (rows / rows.sum().clamp(min=1)).tolist()
        stats["dead_experts"] = float((rows == 0).sum())
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
    return stats
