"""Worker: one VQMoE layer at expert parallelism EP = world size, forward + backward in float64.

Each rank routes its own tokens; saves inputs, outputs, input gradients, its dense parameter
gradients (local names) and its experts' gradients (global names) to OUT/rank{r}.pt for the
test process to compare with EP = 1 runs on the same tokens.
"""

import argparse
import os
from pathlib import Path

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from moe_helpers import build_moe_layer, moe_variant

from vqmoe_megatron.distributed import destroy_distributed, init_distributed
from vqmoe_megatron.parallel_tensors import global_tensors, is_expert_param

S, B = 6, 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--dispatcher", default="alltoall")
    parser.add_argument("--mode", default="pretrain")
    parser.add_argument("--expert-input", default="paper")
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--expert-backend", default="grouped")
    args = parser.parse_args()

    layout = init_distributed(tensor_parallel=1, expert_parallel=int(os.environ["WORLD_SIZE"]))
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    moe = moe_variant(
        token_dispatcher=args.dispatcher,
        routing_mode=args.mode,
        expert_input=args.expert_input,
        topk=args.topk,
        expert_backend=args.expert_backend,
    )
    layer = build_moe_layer(moe).double().train()
    torch.manual_seed(100 + layout.rank)
    x = torch.randn(S, B, layer.config.hidden_size, dtype=torch.float64, requires_grad=True)
    proj = torch.randn(S, B, layer.config.hidden_size, dtype=torch.float64)
    y, _ = layer(x)
    (y * proj).sum().backward()

    num_local = layer.num_local_experts
    dense, experts = {}, {}
    for name, param in layer.named_parameters():
        if param.grad is None:
            continue
        if is_expert_param(name):
            experts.update(global_tensors(name, param.grad, num_local, layout.rank))
        else:
            dense[name] = param.grad
    torch.save(
        {
            "x": x.detach(),
            "proj": proj,
            "y": y.detach(),
            "x_grad": x.grad,
            "dense": dense,
            "experts": experts,
        },
        Path(args.out) / f"rank{layout.rank}.pt",
    )
    destroy_distributed()


if __name__ == "__main__":
    main()
