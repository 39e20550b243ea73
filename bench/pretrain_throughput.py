"""Pretraining throughput: VQMoE vs megatron-core top-2 / top-1 MoE vs dense, on each expert
backend.

The models (same trunk; MoE layers: VQMoE in pretrain mode, megatron's TopKRouter at top-2 and
top-1, and a dense MLP as wide as two experts, i.e. top-2's active parameters) each get their own
DeepSpeed engine in ONE process and train on the SAME batches, one step each in turn, so that
machine noise hits all of them alike. ``megatron top-2`` / ``top-1`` are megatron as it ships
(SequentialMLP experts without Transformer Engine, TE's grouped GEMM with it); the other rows
name their expert backend (``te`` rows only where Transformer Engine is used). Reports median tokens/s, ratios to
megatron top-2 and, on a GPU with a known bf16 peak (or ``train.peak_tflops``), MFU.

    python bench/pretrain_throughput.py                       # shards of the SOTU test fixture
    python bench/pretrain_throughput.py --data-dir data/sotu_shards --steps 60 --json out.json
    python bench/pretrain_throughput.py --list              # the row names (for --only NAME)
    python bench/pretrain_throughput.py --only "megatron top-2" --only "vqmoe pretrain (top-1 + VQ, grouped)"
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from vqmoe_megatron.config import PretrainConfig, load_config
from vqmoe_megatron.data import TokenShardLoader, check_manifest_matches, load_manifest
from vqmoe_megatron.distributed import destroy_distributed, init_distributed
from vqmoe_megatron.model import build_model, use_transformer_engine
from vqmoe_megatron.training.codebook import write_codebook_rows
from vqmoe_megatron.training.engine import initialize_engine
from vqmoe_megatron.training.flops import device_peak_tflops, flops_per_token, model_size
from vqmoe_megatron.training.language_model import LanguageModel

REPO = Path(__file__).resolve().parent.parent


def fixture_shards(seq_length: int) -> Path:
    """Tokenizer + shards of the committed SOTU fixture in a temporary directory."""
    from vqmoe_megatron.data.sharding import ShardSettings, build_shards
    from vqmoe_megatron.data.tokenizer_training import TokenizerSettings, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="vqmoe-bench-"))
    fixture = REPO / "tests" / "fixtures" / "sotu"
    train_tokenizer(
        TokenizerSettings(inputs=[str(fixture)], output_prefix=str(work / "tok"), vocab_size=512),
        progress=False,
    )
    settings = ShardSettings(
        inputs=[str(fixture)],
        tokenizer=str(work / "tok.model"),
        output=str(work / "shards"),
        seq_length=seq_length,
        valid_fraction=0.05,
        workers=1,
    )
    build_shards(settings, progress=False, log=lambda _: None)
    return work / "shards"


def variants(cfg: PretrainConfig, te: bool) -> dict[str, PretrainConfig]:
    """Every benchmarked model by row name (``te``: add the Transformer Engine rows)."""
    moe = cfg.moe
    shipped = "te" if te else "sequential"
    backends = ["grouped", "sequential"] + (["te"] if te else [])

    def moe_row(backend: str, **settings) -> PretrainConfig:
        return replace(cfg, moe=replace(moe, expert_backend=backend, **settings))

    rows = {
        "megatron top-2": moe_row(shipped, router="topk", topk=2),
        "megatron top-1": moe_row(shipped, router="topk", topk=1),
        "megatron top-2 (grouped)": moe_row("grouped", router="topk", topk=2),
    }
    for backend in backends:
        rows[f"vqmoe pretrain (top-1 + VQ, {backend})"] = moe_row(backend, router="vqmoe", topk=1)
    dense_width = 2 * moe.expert_ffn_hidden_size
    rows[f"dense ffn {dense_width}"] = replace(
        cfg,
        model=replace(cfg.model, ffn_hidden_size=dense_width),
        moe=replace(moe, num_experts=0),
    )
    return rows


def select(rows: dict[str, PretrainConfig], only: list[str] | None) -> dict[str, PretrainConfig]:
    """The rows named in ``only`` (None: all); an unknown name is an error."""
    if not only:
        return rows
    unknown = [name for name in only if name not in rows]
    if unknown:
        raise SystemExit(f"error: --only {unknown[0]!r} is not a row; rows: {'; '.join(rows)}")
    return {name: rows[name] for name in only}


def engines_device(engines: dict) -> str:
    """The device the engines train on, in words."""
    device = next(iter(engines.values()))[2].device
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    return str(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "pretrain/configs/tiny.yaml"))
    parser.add_argument(
        "--data-dir", help="shards from data_tools/shard.py (default: SOTU fixture)"
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument(
        "--only", action="append", help="a row to run (repeat for more; default: all rows)"
    )
    parser.add_argument(
        "--list", action="store_true", help="print the row names of this config and exit"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value settings")
    args = parser.parse_args()

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    rows = select(variants(cfg, te=use_transformer_engine(cfg.model)), args.only)
    if args.list:
        print("\n".join(rows))
        return
    data_dir = Path(args.data_dir) if args.data_dir else fixture_shards(cfg.model.seq_length)
    manifest = load_manifest(data_dir)
    if cfg.model.vocab_size is None:
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=manifest.vocab_size))
    check_manifest_matches(
        manifest, vocab_size=cfg.model.vocab_size, seq_length=cfg.model.seq_length
    )
    rows = select(variants(cfg, te=use_transformer_engine(cfg.model)), args.only)  # + vocabulary
    init_distributed(1, 1, seed=cfg.train.seed)
    engines = {}
    for name, variant in rows.items():
        gpt = build_model(variant.model, variant.moe, variant.parallel, seed=cfg.train.seed)
        gpt.routing_metrics.enabled = False
        engine = initialize_engine(
            LanguageModel(gpt, manifest.pad_id), gpt, variant.train, cfg.data.micro_batch_size
        )
        engines[name] = (variant, gpt, engine)
    loader = TokenShardLoader(
        data_dir,
        "train",
        micro_batch_size=cfg.data.micro_batch_size,
        dp_rank=0,
        dp_size=1,
        num_workers=0,
        seed=cfg.data.seed,
    )
    batches = iter(loader)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for step in range(args.warmup + args.steps):
        batch = next(batches)["tokens"]
        for name, (_, gpt, engine) in engines.items():
            tokens = batch.to(engine.device)
            start = time.perf_counter()
            loss, _, _ = engine(tokens)
            engine.backward(loss)
            engine.step()
            # the trainers' per-step codebook upkeep (usage counts, EMA, dead-code restarts)
            gpt.maintain_codebooks(step + 1, cfg.train.seed, write_codebook_rows(engine))
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    tokens_per_step = cfg.data.micro_batch_size * cfg.model.seq_length
    reference = statistics.median(times.get("megatron top-2", next(iter(times.values()))))
    peak = cfg.train.peak_tflops or device_peak_tflops(cfg.train.precision)
    print(
        f"pretraining step (fwd+bwd+ZeRO-{cfg.train.zero_stage} AdamW), {args.config}: "
        f"micro-batch {cfg.data.micro_batch_size} x seq {cfg.model.seq_length}, "
        f"{cfg.train.precision}, {engines_device(engines)}, torch threads "
        f"{torch.get_num_threads()}, median of {args.steps} steps after {args.warmup} warm-up"
    )
    print(
        f"{'variant':40s} {'active params':>14s} {'GFLOP/token':>12s} {'tokens/s':>10s} "
        f"{'time vs top-2':>14s} {'MFU':>6s}"
    )
    results = {}
    for name, (variant, _, _) in engines.items():
        median = statistics.median(times[name])
        active = model_size(variant.model, variant.moe).active
        flops = flops_per_token(variant.model, variant.moe, variant.model.seq_length)
        rate = tokens_per_step / median
        mfu = None if peak is None else rate * flops / (peak * 1e12)
        results[name] = {
            "tokens_per_s": rate,
            "step_s": median,
            "active_params": active,
            "mfu": mfu,
        }
        print(
            f"{name:40s} {active:14,d} {flops / 1e9:12.4f} {rate:10.0f} "
            f"{median / reference:14.3f} {'-' if mfu is None else f'{mfu:.1%}':>6s}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"settings": vars(args), "results": results}, indent=2)
        )
    destroy_distributed()


if __name__ == "__main__":
    main()
