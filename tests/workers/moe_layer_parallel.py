"""Worker: one MoE layer at expert parallelism EP = world size, forward + backward in float64.

``--baselines`` runs every case of ``moe_helpers.ROUTER_EP_CASES`` (baseline routers, with the
training step handed to step-dependent ones) in one launch, into OUT/<case index>/. Each rank
routes its own tokens (and token ids); saves inputs, outputs, input gradients, its dense parameter
gradients (local names) and its experts' gradients (global names) to OUT/rank{r}.pt for the
test process to compare with EP = 1 runs on the same tokens.
"""

import argparse
import os
from pathlib import Path

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from moe_helpers import ROUTER_EP_CASES, TINY_MODEL, build_moe_layer, moe_variant

from vqmoe_megatron.distributed import destroy_distributed, init_distributed
from vqmoe_megatron.parallel_tensors import global_tensors, is_expert_param

S, B = 6, 4


def run_case(layout, moe, step: int, out: Path) -> None:
    """Forward + backward one layer of ``moe`` on this rank's tokens; save the results."""
    layer = build_moe_layer(moe).double().train()
    layer.begin_step(step, seed=0)
    torch.manual_seed(100 + layout.rank)
    x = torch.randn(S, B, layer.config.hidden_size, dtype=torch.float64, requires_grad=True)
    proj = torch.randn(S, B, layer.config.hidden_size, dtype=torch.float64)
    ids = torch.randint(0, TINY_MODEL.vocab_size, (B, S))
    if hasattr(layer.router, "set_token_ids"):
        layer.router.set_token_ids(ids)
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
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "x": x.detach(),
            "ids": ids,
            "proj": proj,
            "y": y.detach(),
            "x_grad": x.grad,
            "dense": dense,
            "experts": experts,
        },
        out / f"rank{layout.rank}.pt",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--dispatcher", default="alltoall")
    parser.add_argument("--mode", default="pretrain")
    parser.add_argument("--expert-input", default="paper")
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--expert-backend", default="grouped")
    parser.add_argument(
        "--baselines", action="store_true", help="run ROUTER_EP_CASES into OUT/<index>/"
    )
    args = parser.parse_args()

    layout = init_distributed(tensor_parallel=1, expert_parallel=int(os.environ["WORLD_SIZE"]))
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    if args.baselines:
        for index, (moe, step) in enumerate(ROUTER_EP_CASES):
            run_case(layout, moe, step, Path(args.out) / str(index))
    else:
        moe = moe_variant(
            token_dispatcher=args.dispatcher,
            routing_mode=args.mode,
            expert_input=args.expert_input,
            topk=args.topk,
            expert_backend=args.expert_backend,
        )
        run_case(layout, moe, 1, Path(args.out))
    destroy_distributed()


if __name__ == "__main__":
    main()
