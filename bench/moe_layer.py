"""Forward + backward time of one MoE layer: megatron-core TopKRouter vs VQMoE vs dense, on
megatron's SequentialMLP experts and on the grouped-GEMM experts.

All variants are built by the project's own builder (the same megatron MoELayer and dispatcher;
megatron's TopKRouter with a device-agnostic gating GEMM) and timed in one process, interleaved
round-robin so that machine noise hits every variant alike. ``megatron top-2`` / ``top-1`` are
megatron as it ships (SequentialMLP experts); rows marked ``(grouped)`` / ``(sequential)`` run
the router on that expert backend, unmarked VQMoE rows on the default (grouped). The table
reports medians and ratios against megatron top-2 / top-1, as shipped and on the grouped backend.

    python bench/moe_layer.py                      # d 256, FFN 512, 16 experts, 4096 tokens, fp32
    python bench/moe_layer.py --tokens 8192 --json results.json
    python bench/moe_layer.py --iters 5 --profile "vqmoe pretrain (paper input)"
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
    seq, grouped = (
        replace(base, expert_backend="sequential"),
        replace(base, expert_backend="grouped"),
    )
    routers = {
        "pretrain (paper input)": dict(expert_input="paper"),
        "pretrain (token input)": dict(expert_input="token"),
        "discrete": dict(routing_mode="discrete"),
    }
    variants = {
        "megatron top-2": (True, replace(seq, router="topk", topk=2), model),
        "megatron top-1": (True, replace(seq, router="topk", topk=1), model),
        "megatron top-2 (grouped)": (True, replace(grouped, router="topk", topk=2), model),
        "megatron top-1 (grouped)": (True, replace(grouped, router="topk", topk=1), model),
    }
    for name, settings in routers.items():
        variants[f"vqmoe {name}"] = (True, replace(grouped, **settings), model)
    for name, settings in routers.items():
        variants[f"vqmoe {name} (sequential)"] = (True, replace(seq, **settings), model)
    variants[f"dense ffn {args.ffn}"] = (False, base, model)
    wide = replace(model, ffn_hidden_size=2 * args.ffn)
    variants[f"dense ffn {2 * args.ffn}"] = (False, base, wide)
    return variants


def _step(block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    start = time.perf_counter()
    x = x.detach().requires_grad_(True)
    out, _ = block(x)
    out.backward(grad)
    elapsed = time.perf_counter() - start
    block.zero_grad(set_to_none=True)
    return elapsed


def _profile(name: str, block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """torch.profiler table of 5 fwd+bwd steps of one row, ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            _step(block, x, grad)
    print(f"\nprofile of {name!r} (5 steps):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


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
    parser.add_argument(
        "--profile",
        action="append",
        metavar="ROW",
        help="after timing, print torch.profiler's top ops (self CPU time) of this row",
    )
    args = parser.parse_args()

    variants = _variants(args)
    unknown = [name for name in args.profile or [] if name not in variants]
    if unknown:
        parser.error(f"--profile {unknown[0]!r} is not a row; rows: {'; '.join(variants)}")
    init_distributed(1, 1)
    torch.manual_seed(0)
    seq, batch = 512, args.tokens // 512
    blocks = {}
    for name, (is_moe, moe, model) in variants.items():
        blocks[name] = build_mlp_block(
            model, moe, ParallelConfig(), seed=0, moe_layer=is_moe
        ).train()
        for collector in metrics.collectors(blocks[name]):
            collector.enabled = False
    x = torch.randn(seq, batch, args.hidden)
    grad = torch.randn(seq, batch, args.hidden)
    times: dict[str, list[float]] = {name: [] for name in blocks}
    for it in range(args.warmup + args.iters):
        for name, block in blocks.items():
            elapsed = _step(block, x, grad)
            if it >= args.warmup:
                times[name].append(elapsed)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    columns = [
        "megatron top-2",
        "megatron top-1",
        "megatron top-2 (grouped)",
        "megatron top-1 (grouped)",
    ]
    print(
        f"MoE layer fwd+bwd, d={args.hidden} ffn={args.ffn} E={args.experts} "
        f"tokens={args.tokens} fp32, torch threads={torch.get_num_threads()}, "
        f"median of {args.iters}"
    )
    print(f"{'variant':42s} {'ms':>9s}" + "".join(f" {'vs ' + c[9:]:>20s}" for c in columns))
    for name, ms in medians.items():
        print(f"{name:42s} {ms:9.2f}" + "".join(f" {ms / medians[c]:20.3f}" for c in columns))
    for name in args.profile or []:
        _profile(name, blocks[name], x, grad)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"settings": vars(args), "median_ms": medians}, fh, indent=2)
    destroy_distributed()


if __name__ == "__main__":
    main()
