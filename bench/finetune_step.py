"""Fine-tuning step time: discrete routing (router and gate dropped) against the same model with
the router kept (``pretrain`` routing), side by side in one process.

Both variants hold the same weights: the discrete model (built without router and gate) takes
every other tensor from the pretrain-mode one. Each is wrapped as the fine-tuning SequenceClassifier
(last-token pooling, 2 labels, frozen codebook, as ``finetune/glue.py`` trains it) and trained
with torch's AdamW on the same batches; one step = forward + backward + optimizer step on
``--batch`` sequences of ``--seq`` tokens. The variants alternate step by step so that machine
noise hits both alike; the table reports medians, the expert rows each token is dispatched to,
the trained parameters, and the arithmetic (training FLOPs per token without the LM output layer,
which fine-tuning does not run, from ``training/flops.py``).

    python bench/finetune_step.py                   # base config: 4 layers, d 256, 16 experts
    python bench/finetune_step.py --batch 16 --seq 256 --json results.json
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
from vqmoe_megatron.finetune.classifier import SequenceClassifier, task_loss
from vqmoe_megatron.finetune.glue_task import freeze_unused
from vqmoe_megatron.model import build_model, padded_vocab_size
from vqmoe_megatron.training.flops import flops_per_token

VARIANTS = {
    "pretrain": "pretrain (router + gate kept)",
    "discrete": "discrete (router + gate dropped)",
}


def _configs(args: argparse.Namespace) -> tuple[ModelConfig, MoEConfig]:
    model = ModelConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        ffn_hidden_size=args.expert_ffn,
        vocab_size=args.vocab,
        seq_length=args.seq,
        use_transformer_engine="never",
    )
    moe = MoEConfig(
        num_experts=args.experts,
        expert_ffn_hidden_size=args.expert_ffn,
        expert_input=args.expert_input,
    )
    return model, moe


def _classifiers(model: ModelConfig, moe: MoEConfig) -> dict[str, SequenceClassifier]:
    pretrain = build_model(model, replace(moe, routing_mode="pretrain"), ParallelConfig(), seed=0)
    discrete = build_model(model, replace(moe, routing_mode="discrete"), ParallelConfig(), seed=0)
    result = discrete.load_state_dict(pretrain.state_dict(), strict=False)
    if result.missing_keys or any(".router." not in k for k in result.unexpected_keys):
        raise RuntimeError(f"the two models differ beyond router and gate: {result}")
    out = {}
    for name, gpt in (("pretrain", pretrain), ("discrete", discrete)):
        freeze_unused(gpt, train_codebook=False)
        out[name] = SequenceClassifier(gpt, 2, "last", dropout=0.1, seed=0).train()
    return out


def _model_flops(model: ModelConfig, moe: MoEConfig, mode: str) -> float:
    """Training FLOPs per token of the trunk (the LM output projection is not run)."""
    total = flops_per_token(model, replace(moe, routing_mode=mode), model.seq_length)
    return total - 3.0 * 2.0 * model.hidden_size * padded_vocab_size(model.vocab_size, 1)


def _step(model, optimizer, ids, lengths, labels) -> float:
    start = time.perf_counter()
    task_loss(model(ids, lengths), labels, regression=False).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _rows_per_token(model: SequenceClassifier, ids, lengths) -> float:
    """Expert rows per token of one training forward pass (routing metrics, layer 1); the
    model's routing metrics stay off afterwards (the timed steps do not record)."""
    collector = model.gpt.routing_metrics
    collector.reset()
    model(ids, lengths)
    value = collector.summarize()[1]["rows_per_token"]
    collector.enabled = False
    return value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--expert-ffn", type=int, default=512)
    parser.add_argument("--expert-input", default="paper", choices=["paper", "token", "quantized"])
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()

    init_distributed(1, 1)
    model_cfg, moe_cfg = _configs(args)
    models = _classifiers(model_cfg, moe_cfg)
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
        for name, m in models.items()
    }
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, args.vocab, (args.batch, args.seq), generator=generator)
    lengths = torch.full((args.batch,), args.seq)
    labels = torch.randint(0, 2, (args.batch,), generator=generator)
    rows = {name: _rows_per_token(m, ids, lengths) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for it in range(args.warmup + args.iters):
        for name, model in models.items():
            elapsed = _step(model, optimizers[name], ids, lengths, labels)
            if it >= args.warmup:
                times[name].append(elapsed)
    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    flops = {name: _model_flops(model_cfg, moe_cfg, name) for name in models}
    trained = {
        name: sum(p.numel() for p in m.parameters() if p.requires_grad)
        for name, m in models.items()
    }
    print(
        f"fine-tuning step (forward + backward + AdamW), {args.layers} layers, d={args.hidden}, "
        f"{args.experts} experts, expert FFN {args.expert_ffn}, expert input {args.expert_input}, "
        f"batch {args.batch} x {args.seq} tokens, fp32, torch threads {torch.get_num_threads()}, "
        f"median of {args.iters} alternating steps"
    )
    print(
        "| routing | ms/step | sequences/s | expert rows/token | trained params "
        "| model GFLOPs/token | time vs pretrain | FLOPs vs pretrain |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, label in VARIANTS.items():
        print(
            f"| {label} | {median[name]:.1f} | {args.batch / median[name] * 1e3:.1f} "
            f"| {rows[name]:.2f} | {trained[name]:,} | {flops[name] / 1e9:.4f} "
            f"| {median[name] / median['pretrain']:.3f} | {flops[name] / flops['pretrain']:.3f} |"
        )
    saved_time = 1 - median["discrete"] / median["pretrain"]
    saved_flops = 1 - flops["discrete"] / flops["pretrain"]
    print(
        f"discrete routing: {100 * saved_time:.1f}% less step time, "
        f"{100 * saved_flops:.1f}% fewer FLOPs than with the router kept"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "settings": vars(args),
                    "median_ms": median,
                    "rows_per_token": rows,
                    "trained_params": trained,
                    "flops_per_token": flops,
                },
                fh,
                indent=2,
            )
    destroy_distributed()


if __name__ == "__main__":
    main()
