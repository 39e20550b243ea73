"""Pretraining throughput of the tiny config: VQMoE vs megatron-core top-2 MoE vs dense.

Three models (same trunk; MoE layers: VQMoE in pretrain mode, megatron's TopKRouter at top-2,
and a dense MLP as wide as two experts, i.e. the same active parameters) each get their own
DeepSpeed ZeRO-2 engine in ONE process and train on the SAME batches, one step each in turn,
so that machine noise hits all three alike. Reports median tokens/s and ratios to top-2.

    python bench/pretrain_throughput.py                       # shards of the SOTU test fixture
    python bench/pretrain_throughput.py --data-dir data/sotu_shards --steps 60 --json out.json
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
from vqmoe_megatron.model import build_model
from vqmoe_megatron.moe import metrics
from vqmoe_megatron.training.codebook import write_codebook_rows
from vqmoe_megatron.training.engine import LanguageModel, initialize_engine
from vqmoe_megatron.training.flops import flops_per_token, model_size

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


def variants(cfg: PretrainConfig) -> dict[str, PretrainConfig]:
    moe = cfg.moe
    dense_width = 2 * moe.expert_ffn_hidden_size
    return {
        "megatron top-2": replace(cfg, moe=replace(moe, router="topk", topk=2)),
        "vqmoe pretrain (top-1 + VQ)": replace(cfg, moe=replace(moe, router="vqmoe", topk=1)),
        f"dense ffn {dense_width}": replace(
            cfg,
            model=replace(cfg.model, ffn_hidden_size=dense_width),
            moe=replace(moe, num_experts=0),
        ),
    }


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
    parser.add_argument("overrides", nargs="*", help="section.key=value settings")
    args = parser.parse_args()

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    data_dir = Path(args.data_dir) if args.data_dir else fixture_shards(cfg.model.seq_length)
    manifest = load_manifest(data_dir)
    if cfg.model.vocab_size is None:
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=manifest.vocab_size))
    check_manifest_matches(
        manifest, vocab_size=cfg.model.vocab_size, seq_length=cfg.model.seq_length
    )
    init_distributed(1, 1, seed=cfg.train.seed)
    metrics.set_enabled(False)
    engines = {}
    for name, variant in variants(cfg).items():
        gpt = build_model(variant.model, variant.moe, variant.parallel, seed=cfg.train.seed)
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
        tokens = next(batches)["tokens"]
        for name, (_, gpt, engine) in engines.items():
            start = time.perf_counter()
            loss, _, _ = engine(tokens)
            engine.backward(loss)
            engine.step()
            # the trainers' per-step codebook upkeep (usage counts, EMA, dead-code restarts)
            gpt.maintain_codebooks(step + 1, cfg.train.seed, write_codebook_rows(engine))
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    tokens_per_step = cfg.data.micro_batch_size * cfg.model.seq_length
    reference = statistics.median(times["megatron top-2"])
    print(
        f"pretraining step (fwd+bwd+ZeRO-2 AdamW), {args.config}: micro-batch "
        f"{cfg.data.micro_batch_size} x seq {cfg.model.seq_length}, fp32, torch threads "
        f"{torch.get_num_threads()}, median of {args.steps} steps after {args.warmup} warm-up"
    )
    print(
        f"{'variant':30s} {'active params':>14s} {'GFLOP/token':>12s} {'tokens/s':>10s} {'time vs top-2':>14s}"
    )
    results = {}
    for name, (variant, _, _) in engines.items():
        median = statistics.median(times[name])
        active = model_size(variant.model, variant.moe).active
        gflops = flops_per_token(variant.model, variant.moe, variant.model.seq_length) / 1e9
        results[name] = {
            "tokens_per_s": tokens_per_step / median,
            "step_s": median,
            "active_params": active,
        }
        print(
            f"{name:30s} {active:14,d} {gflops:12.4f} {tokens_per_step / median:10.0f} {median / reference:14.3f}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"settings": vars(args), "results": results}, indent=2)
        )
    destroy_distributed()


if __name__ == "__main__":
    main()
