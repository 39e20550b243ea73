"""Worker: one DeepSpeed ZeRO step of the tiny VQMoE GPT at a given TP x EP layout.

Each data-parallel replica trains on its own batch (seeded by its DP rank). Rank 0 saves the loss of every rank, the
gradients DeepSpeed reduced (read between backward and step, gathered to full tensors with
global expert names), the parameters after the step, and each rank's local view of one
expert and one dense parameter (to check what differs across ranks).
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from megatron.core import parallel_state
from moe_helpers import TINY_MODEL, expert_weights, moe_variant

from vqmoe_megatron.config import ParallelConfig, TrainConfig
from vqmoe_megatron.distributed import destroy_distributed, init_distributed
from vqmoe_megatron.model import build_model
from vqmoe_megatron.parallel_tensors import gather_full_tensors
from vqmoe_megatron.training.engine import initialize_engine
from vqmoe_megatron.training.language_model import LanguageModel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--clip", type=float, default=1e9)
    args = parser.parse_args()
    layout = init_distributed(args.tp, args.ep, seed=3)
    moe = moe_variant(topk=2, router_dtype="fp32", num_experts=4)
    parallel = ParallelConfig(tensor_parallel=args.tp, expert_parallel=args.ep)
    gpt = build_model(TINY_MODEL, moe, parallel, seed=3)
    train = TrainConfig(
        zero_stage=args.zero, lr=1e-2, grad_clip=args.clip, warmup_steps=0, lr_schedule="constant"
    )
    engine = initialize_engine(LanguageModel(gpt, pad_id=0), gpt, train, micro_batch_size=4)
    torch.manual_seed(1000 + parallel_state.get_data_parallel_rank())
    tokens = torch.randint(1, TINY_MODEL.vocab_size, (4, TINY_MODEL.seq_length + 1))
    loss, _, _ = engine(tokens)
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p) for n, p in gpt.named_parameters() if p.requires_grad}
    engine.step()
    full_grads = gather_full_tensors(gpt, grads)
    full_params = gather_full_tensors(gpt)
    losses = [torch.zeros(()) for _ in range(dist.get_world_size())]
    dist.all_gather(losses, loss.detach().reshape(()))
    local = {
        "expert": expert_weights(gpt.decoder.layers[0].mlp)[0][0].detach().clone(),
        "dense": gpt.decoder.layers[0].self_attention.linear_qkv.weight.detach().clone(),
    }
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, local)
    if layout.rank == 0:
        torch.save(
            {
                "losses": torch.stack(losses),
                "grads": full_grads,
                "params": full_params,
                "views": views,
            },
            Path(args.out) / f"tp{args.tp}_ep{args.ep}.pt",
        )
    destroy_distributed()


if __name__ == "__main__":
    main()
