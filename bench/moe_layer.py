"""Forward + backward time of one MoE layer: megatron-core TopKRouter vs VQMoE vs dense.

All variants are built by the project's own builder (the same megatron MoELayer, dispatcher and
SequentialMLP experts; megatron's TopKRouter with a device-agnostic gating GEMM) and timed in
one process, interleaved round-robin so that machine noise hits every variant alike. The table
reports medians and ratios against megatron top-2 (and VQMoE discrete against megatron top-1).

    python bench/moe_layer.py                      # d 256, FFN 512, 16 experts, 4096 tokens, fp32
    python bench/moe_layer.py --tokens 8192 --json results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

from vqmoe_megatron.config import ModelConfig, MoEConfig, ParallelConfig
from vqmoe_megatron.distributed import destroy_distributed, init_distributed
from vqmoe_megatron.model import build_mlp_block
from vqmoe_megatron.moe import metrics


def _variants(args: argparse.Namespace) -> dict[str, tuple[bool, MoEConfig, ModelConfig]]:
    model = ModelConfig(
        hidden_size=args.hidden,
        num_attention_heads=8,
        ffn_hidden_size=args.ffn,
        use_transformer_engine="never",
    )
    base = MoEConfig(num_experts=args.experts, expert_ffn_hidden_size=args.ffn, router_dtype="fp32")
    return {
        "megatron top-2": (True, replace(base, router="topk", topk=2), model),
        "megatron top-1": (True, replace(base, router="topk", topk=1), model),
        "vqmoe pretrain (paper input)": (True, replace(base, expert_input="paper"), model),
        "vqmoe pretrain (token input)": (True, replace(base, expert_input="token"), model),
        "vqmoe discrete": (True, replace(base, routing_mode="discrete"), model),
        f"dense ffn {args.ffn}": (False, base, model),
        f"dense ffn {2 * args.ffn}": (False, base, replace(model, ffn_hidden_size=2 * args.ffn)),
    }


def _step(block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    start = time.perf_counter()
    x = x.detach().requires_grad_(True)
    out, _ = block(x)
    out.backward(grad)
    elapsed = time.perf_counter() - start
    block.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()

    init_distributed(1, 1)
    metrics.set_enabled(False)
    torch.manual_seed(0)
    seq, batch = 512, args.tokens // 512
    blocks = {}
    for name, (is_moe, moe, model) in _variants(args).items():
        blocks[name] = build_mlp_block(
            model, moe, ParallelConfig(), seed=0, moe_layer=is_moe
        ).train()
    x = torch.randn(seq, batch, args.hidden)
    grad = torch.randn(seq, batch, args.hidden)
    times: dict[str, list[float]] = {name: [] for name in blocks}
    for it in range(args.warmup + args.iters):
        for name, block in blocks.items():
            elapsed = _step(block, x, grad)
            if it >= args.warmup:
                times[name].append(elapsed)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    top2, top1 = medians["megatron top-2"], medians["megatron top-1"]
    print(
        f"MoE layer fwd+bwd, d={args.hidden} ffn={args.ffn} E={args.experts} "
        f"tokens={args.tokens} fp32, torch threads={torch.get_num_threads()}, "
        f"median of {args.iters}"
    )
    print(f"{'variant':32s} {'ms':>9s} {'vs top-2':>9s} {'vs top-1':>9s}")
    for name, ms in medians.items():
        print(f"{name:32s} {ms:9.2f} {ms / top2:9.3f} {ms / top1:9.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"settings": vars(args), "median_ms": medians}, fh, indent=2)
    destroy_distributed()


if __name__ == "__main__":
    main()
