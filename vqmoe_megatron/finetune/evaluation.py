"""Predictions for a whole split, spread over the data-parallel ranks and gathered on each.

Every rank of a data-parallel group runs its share of the batches (``features.eval_batches``);
the tensor-parallel ranks of a group compute the same outputs. The (index, prediction) pairs are
gathered over the data-parallel group, so every rank returns the full, ordered predictions.
Routing metrics are paused meanwhile: they describe training batches only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from vqmoe_megatron.finetune.classifier import predictions
from vqmoe_megatron.finetune.features import EncodedSplit, collate, eval_batches
from vqmoe_megatron.moe import metrics
from vqmoe_megatron.training.run_logger import format_duration

PROGRESS_SECONDS = 30.0
"""Minimum seconds between progress lines of one long evaluation."""


@torch.no_grad()
def predict(
    model: nn.Module,
    split: EncodedSplit,
    *,
    micro_batch_size: int,
    pad_id: int,
    multiple_of: int,
    regression: bool,
    device: torch.device,
    log: Callable[[str], None],
) -> np.ndarray:
    """Class ids (int64) or scores (float64) for every example of ``split``, in file order.

    ``model`` maps (input_ids, lengths) to logits (the DeepSpeed engine or the module itself).
    Collective over all ranks.
    """
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    batches = eval_batches(split, micro_batch_size, dp_rank, dp_size)
    kept_indices, kept_values = [], []
    started = last_report = time.time()
    model.eval()
    try:
        with metrics.paused(model):
            for number, (indices, keep) in enumerate(batches, start=1):
                batch = collate(split, indices, pad_id, multiple_of).to(device)
                values = predictions(model(batch.input_ids, batch.lengths), regression)
                if keep:
                    kept_indices.append(indices)
                    kept_values.append(values.double().cpu().numpy())
                now = time.time()
                if now - last_report >= PROGRESS_SECONDS and number < len(batches):
                    rate = number / (now - started)
                    log(
                        f"evaluating {split.name}: batch {number}/{len(batches)}, "
                        f"{rate * micro_batch_size * dp_size:.0f} examples/s, "
                        f"ETA {format_duration((len(batches) - number) / rate)}"
                    )
                    last_report = now
    finally:
        model.train()
    local = (
        np.concatenate(kept_indices) if kept_indices else np.zeros(0, dtype=np.int64),
        np.concatenate(kept_values) if kept_values else np.zeros(0),
    )
    gathered: list = [None] * dp_size
    dist.all_gather_object(gathered, local, group=parallel_state.get_data_parallel_group())
    out = np.zeros(len(split), dtype=np.float64)
    seen = np.zeros(len(split), dtype=bool)
    for indices, values in gathered:
        out[indices] = values
        seen[indices] = True
    if not seen.all():
        raise RuntimeError(f"internal error: {int((~seen).sum())} examples were not evaluated")
    return out if regression else out.astype(np.int64)
