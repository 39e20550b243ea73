"""Worker: the whole tiny VQMoE GPT at TP = 2 with sequence parallelism, forward + backward.

``--router`` builds the MoE layers with another router (``moe_helpers.baseline_settings``).

Both ranks see the same batch (they are one data-parallel replica). After backward the
gradients of sequence-parallel parameters are summed over TP (what finalize_model_grads does),
then every gradient is gathered into full tensors; rank 0 saves loss and gradients.
"""

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from moe_helpers import TINY_MODEL, baseline_settings, moe_variant

from vqmoe_megatron.config import ParallelConfig
from vqmoe_megatron.distributed import (
    allreduce_sequence_parallel_grads,
    destroy_distributed,
    init_distributed,
)
from vqmoe_megatron.model import build_model
from vqmoe_megatron.parallel_tensors import gather_full_tensors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--dispatcher", default="alltoall")
    parser.add_argument("--expert-backend", default="grouped")
    parser.add_argument("--activation", default=TINY_MODEL.activation)
    parser.add_argument("--router", default="vqmoe")
    args = parser.parse_args()
    layout = init_distributed(tensor_parallel=2, expert_parallel=1)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    moe = moe_variant(
        token_dispatcher=args.dispatcher,
        topk=2,
        expert_backend=args.expert_backend,
        **baseline_settings(args.router),
    )
    model_cfg = replace(TINY_MODEL, activation=args.activation)
    model = build_model(model_cfg, moe, ParallelConfig(tensor_parallel=2), seed=11).double()
    torch.manual_seed(5)
    tokens = torch.randint(0, TINY_MODEL.vocab_size, (4, TINY_MODEL.seq_length + 1))
    loss = model(tokens[:, :-1], None, None, labels=tokens[:, 1:]).mean()
    loss.backward()
    allreduce_sequence_parallel_grads(model)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    full = gather_full_tensors(model, grads)
    if layout.rank == 0:
        torch.save({"loss": loss.detach(), "grads": full}, Path(args.out) / "tp2.pt")
    destroy_distributed()


if __name__ == "__main__":
    main()
