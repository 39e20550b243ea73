"""Language-model evaluation shared by the trainer and ``vqmoe-evaluate``.

:func:`sum_nll` runs a :class:`~vqmoe_megatron.training.language_model.LanguageModel` (or the DeepSpeed
engine around it) over batches ``{"tokens": [B, S+1], "loss_mask": [B, S] (optional)}`` and sums
the negative log-likelihood of the counted targets; :func:`lm_metrics` turns sums into loss
(nats per token), perplexity and bits per byte (``NLL / ln 2 / bytes``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from vqmoe_megatron.moe import metrics


def _any_rank(flag: bool, device: torch.device) -> bool:
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_reduce_sum(
    values: list[float], device: torch.device, group: Optional[dist.ProcessGroup] = None
) -> list[float]:
    """Sum ``values`` over ``group`` (the world by default) in float64."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, group=group)
    return tensor.tolist()


@torch.no_grad()
def sum_nll(
    model: nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    filler: dict,
    limit: Optional[int] = None,
) -> tuple[float, float]:
    """(NLL sum, counted targets) of this rank's batches, at most ``limit`` of them.

    Every rank runs the same number of forward passes, because expert parallelism exchanges
    tokens inside each one: a rank whose batches ran out while others still have some runs
    ``filler`` (a batch whose targets are all masked) with routing metrics off.
    """
    nll, count = 0.0, 0.0
    stream = iter(batches)
    index = 0
    while limit is None or index < limit:
        batch = next(stream, None)
        if not _any_rank(batch is not None, device):
            break
        filling = batch is None
        batch = filler if filling else batch
        with metrics.paused(model) if filling else nullcontext():
            mask = batch.get("loss_mask")
            _, batch_nll, batch_count = model(
                batch["tokens"].to(device), None if mask is None else mask.to(device)
            )
        nll += float(batch_nll)
        count += float(batch_count)
        index += 1
    return nll, count


def filler_batch(pad_id: int, seq_length: int) -> dict:
    """A one-sample batch whose targets are all padding (counts nothing), for :func:`sum_nll`."""
    return {"tokens": torch.full((1, seq_length + 1), pad_id, dtype=torch.long)}


def lm_metrics(nll: float, count: float, num_bytes: float) -> dict[str, float]:
    """loss (nats per token), ppl, bpb (bits per byte of the scored text) and the token count."""
    loss = nll / max(count, 1.0)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": nll / math.log(2) / max(num_bytes, 1.0),
        "tokens": count,
    }
