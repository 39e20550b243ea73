"""Worker: the tiny fine-tuning classifier at TP = 2 with sequence parallelism, forward + backward.

Both ranks see the same padded batch. After backward the gradients of sequence-parallel
parameters are summed over TP (the engine's gradient hooks do this in a run), then every gradient
is gathered into full tensors; rank 0 saves logits, loss and gradients.
"""

import argparse
from pathlib import Path

import torch
from finetune_batch import classifier_batch, tiny_classifier
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from vqmoe_megatron.config import ParallelConfig
from vqmoe_megatron.distributed import (
    allreduce_sequence_parallel_grads,
    destroy_distributed,
    init_distributed,
)
from vqmoe_megatron.finetune.classifier import task_loss
from vqmoe_megatron.parallel_tensors import gather_full_tensors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--pooling", required=True)
    args = parser.parse_args()
    layout = init_distributed(tensor_parallel=2, expert_parallel=1)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    model = tiny_classifier(ParallelConfig(tensor_parallel=2), args.pooling)
    ids, lengths, labels = classifier_batch()
    logits = model(ids, lengths)
    loss = task_loss(logits, labels, regression=False)
    loss.backward()
    allreduce_sequence_parallel_grads(model)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    full = gather_full_tensors(model, grads)
    if layout.rank == 0:
        torch.save(
            {"logits": logits.detach(), "loss": loss.detach(), "grads": full},
            Path(args.out) / "tp2.pt",
        )
    destroy_distributed()


if __name__ == "__main__":
    main()
