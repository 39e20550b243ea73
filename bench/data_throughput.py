"""Data pipeline throughput: ``python bench/data_throughput.py --help``.

Side by side in one run, on the same text, for each ``--workers`` count W:
- sentencepiece's own batch encode of every document with ``num_threads=W``, returning Python
  lists (``encode(texts)``) and numpy arrays (``encode(texts, out_type="numpy")``, the faster),
- data_tools/shard.py end to end with ``--workers W`` (``build_shards``: reading, decoding,
  splitting, tokenizing, packing, writing and checksumming the shards and the manifest).
Runs alternate between the three and report medians, because the box may be shared; the CPU
ratios (CPU seconds of all processes and threads) are what contention changes least, and
shard.py's CPU is also shown split into its main process and its workers. Then:
- the loader reading the shards back at the ``--step-config`` data settings (micro-batch,
  ``num_workers``) and with ``num_workers=0``, in samples per second,
- against what a training step at ``--step-config`` consumes: micro-batch / step time of the
  real pretraining step (fwd + bwd + ZeRO-2 AdamW, one process, CPU) on those shards, and the
  MFU up to which the loader would keep up with that step on a GPU of ``--gpu-peak-tflops``
  (samples/s x seq_length x training FLOPs per token / peak).
The input is the corpus repeated ``--copies`` times (as separate files), so the fixed costs of
a run (process start-up, manifest) weigh as much as they would on that much text, and shards
are ``--shard-size-mb`` (8) so that, as on a corpus much larger than one shard, most of the
writing overlaps the tokenizing instead of all of it coming after the last chunk.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Optional

from vqmoe_megatron.config import PretrainConfig, load_config
from vqmoe_megatron.data import (
    DataError,
    Tokenizer,
    TokenShardLoader,
    check_manifest_matches,
    load_manifest,
)
from vqmoe_megatron.data.cli import available_cpus, run_cli
from vqmoe_megatron.data.sharding import ShardSettings, build_shards
from vqmoe_megatron.data.sources import iter_documents, resolve_inputs
from vqmoe_megatron.data.tokenizer_training import TokenizerSettings, train_tokenizer
from vqmoe_megatron.training.flops import PEAK_TFLOPS


def _copies(source: Path, copies: int, folder: Path) -> Path:
    """``copies`` copies of every input file under ``folder`` (hard links where possible)."""
    items = resolve_inputs([str(source)])
    for k in range(copies):
        for item in items:
            target = folder / f"copy{k}" / item.path.relative_to(source.resolve())
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(item.path, target)
            except OSError:
                shutil.copyfile(item.path, target)
    return folder


def _cpu_seconds() -> tuple[float, float]:
    """CPU time of this process (all threads) and of its finished child processes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _timed(work: Callable[[], object]) -> tuple[float, float, float]:
    """Wall-clock seconds of ``work()``, and its CPU seconds in this process and in the
    processes it started (shard.py's workers)."""
    wall, (own, children) = time.perf_counter(), _cpu_seconds()
    work()
    after = _cpu_seconds()
    return time.perf_counter() - wall, after[0] - own, after[1] - children


def _shard(settings: ShardSettings) -> None:
    shutil.rmtree(settings.output, ignore_errors=True)
    build_shards(settings, progress=False, log=lambda _: None)


def _loader_rate(data: Path, workers: int, batches: int, micro_batch_size: int) -> float:
    """Samples per second of the training loader (its first batch, worker start-up, excluded)."""
    loader = TokenShardLoader(
        data,
        micro_batch_size=micro_batch_size,
        dp_rank=0,
        dp_size=1,
        num_workers=workers,
        seed=0,
    )
    stream = iter(loader)
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    rate = batches * micro_batch_size / (time.perf_counter() - start)
    stream.close()
    return rate


def _step_rate(config: str, data: Path, steps: int, warmup: int) -> tuple[float, float]:
    """(samples/s, GFLOP per token) of the real VQMoE pretraining step at ``config`` on ``data``:
    median over ``steps`` steps after ``warmup``, one process (fwd + bwd + ZeRO-2 AdamW)."""
    from vqmoe_megatron.distributed import destroy_distributed, init_distributed
    from vqmoe_megatron.model import build_model
    from vqmoe_megatron.training.codebook import write_codebook_rows
    from vqmoe_megatron.training.engine import initialize_engine
    from vqmoe_megatron.training.flops import flops_per_token
    from vqmoe_megatron.training.language_model import LanguageModel

    cfg = load_config(PretrainConfig, config)
    manifest = load_manifest(data)
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=manifest.vocab_size))
    check_manifest_matches(
        manifest, vocab_size=manifest.vocab_size, seq_length=cfg.model.seq_length
    )
    init_distributed(1, 1, seed=cfg.train.seed)
    gpt = build_model(cfg.model, cfg.moe, cfg.parallel, seed=cfg.train.seed)
    gpt.routing_metrics.enabled = False
    engine = initialize_engine(
        LanguageModel(gpt, manifest.pad_id), gpt, cfg.train, cfg.data.micro_batch_size
    )
    stream = iter(
        TokenShardLoader(
            data,
            micro_batch_size=cfg.data.micro_batch_size,
            dp_rank=0,
            dp_size=1,
            num_workers=0,
            seed=cfg.data.seed,
        )
    )
    times = []
    for step in range(warmup + steps):
        tokens = next(stream)["tokens"]
        start = time.perf_counter()
        loss, _, _ = engine(tokens)
        engine.backward(loss)
        engine.step()
        gpt.maintain_codebooks(step + 1, cfg.train.seed, write_codebook_rows(engine))
        if step >= warmup:
            times.append(time.perf_counter() - start)
    destroy_distributed()
    gflops = flops_per_token(cfg.model, cfg.moe, cfg.model.seq_length) / 1e9
    return cfg.data.micro_batch_size / statistics.median(times), gflops


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--input",
        default="data/corpora/sotu/text",
        help="text to shard (default: fetch it with data_tools/fetch_corpus.py sotu)",
    )
    p.add_argument(
        "--copies",
        type=int,
        nargs="+",
        default=[1, 4],
        help="input sizes to measure, as multiples of --input",
    )
    p.add_argument("--tokenizer", help="sentencepiece model (default: train one on --input)")
    p.add_argument("--vocab-size", type=int, default=8000, help="of the trained tokenizer")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--shard-size-mb", type=float, default=8.0)
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=sorted({1, available_cpus()}),
        help="shard.py --workers / encode threads to measure",
    )
    p.add_argument("--runs", type=int, default=3, help="alternating runs per measurement")
    p.add_argument("--loader-batches", type=int, default=500)
    p.add_argument(
        "--step-config",
        default="pretrain/configs/base.yaml",
        help="config whose training step and data settings the loader is compared with",
    )
    p.add_argument("--step-steps", type=int, default=5, help="timed steps (after 2 warm-up)")
    p.add_argument(
        "--gpu-peak-tflops",
        type=float,
        default=PEAK_TFLOPS["H100"],
        help="dense bf16 peak of the GPU the loader is compared with (default: H100's)",
    )
    args = p.parse_args(argv)
    source = Path(args.input)
    if not source.exists():
        raise DataError(
            f"--input {source} does not exist; run python data_tools/fetch_corpus.py sotu first "
            "or pass --input with any text"
        )
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        work = Path(tmp)
        model = args.tokenizer
        if model is None:
            prefix = str(work / "tokenizer")
            settings = TokenizerSettings(
                [str(source)], prefix, vocab_size=args.vocab_size, threads=max(args.workers)
            )
            train_tokenizer(settings, progress=False)
            model = prefix + ".model"
        tokenizer = Tokenizer(model)
        load = os.getloadavg()
        rows = []
        for copies in args.copies:
            inputs = _copies(source, copies, work / f"text{copies}")
            sources = resolve_inputs([str(inputs)])
            texts = [t for _, d in iter_documents(sources) for t in d.texts]
            megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
            for workers in args.workers:
                settings = ShardSettings(
                    [str(inputs)],
                    model,
                    str(work / "shards"),
                    args.seq_length,
                    shard_size_mb=args.shard_size_mb,
                    workers=workers,
                )
                encode = partial(tokenizer.processor.encode, texts, num_threads=workers)
                timings: list[list[tuple[float, float, float]]] = [[], [], []]
                for _ in range(args.runs):
                    timings[0].append(_timed(encode))
                    timings[1].append(_timed(partial(encode, out_type="numpy")))
                    timings[2].append(_timed(partial(_shard, settings)))
                medians = [[statistics.median(x) for x in zip(*runs)] for runs in timings]
                rows.append((copies, len(sources), megabytes, workers, medians))
        step_config = load_config(PretrainConfig, args.step_config).data
        rates = {
            workers: _loader_rate(
                work / "shards", workers, args.loader_batches, step_config.micro_batch_size
            )
            for workers in sorted({0, step_config.num_workers})
        }
        step_samples, gflops = _step_rate(args.step_config, work / "shards", args.step_steps, 2)
        after = os.getloadavg()
    print(
        f"input: {args.input}; tokenizer {tokenizer.vocab_size} pieces; seq_length "
        f"{args.seq_length}; {available_cpus()} cores; median of {args.runs} alternating runs; "
        f"load average {load[0]:.2f} before, {after[0]:.2f} after"
    )
    print(
        "| input | workers | encode MB/s (lists / numpy) | shard.py MB/s | ratio to lists / "
        "numpy | CPU s/MB (lists / numpy / shard.py) | shard.py CPU s/MB (main / workers) | "
        "CPU ratio to lists / numpy |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for copies, files, megabytes, workers, medians in rows:
        lists, arrays, shard = (wall for wall, _, _ in medians)
        lists_cpu, arrays_cpu, shard_cpu = (own + children for _, own, children in medians)
        main_cpu, workers_cpu = medians[2][1:]
        print(
            f"| {copies}x ({files} files, {megabytes:.1f} MB) | {workers} | "
            f"{megabytes / lists:.1f} / {megabytes / arrays:.1f} | {megabytes / shard:.1f} | "
            f"{lists / shard:.2f} / {arrays / shard:.2f} | {lists_cpu / megabytes:.4f} / "
            f"{arrays_cpu / megabytes:.4f} / {shard_cpu / megabytes:.4f} | "
            f"{main_cpu / megabytes:.4f} / {workers_cpu / megabytes:.4f} | "
            f"{lists_cpu / shard_cpu:.2f} / {arrays_cpu / shard_cpu:.2f} |"
        )
    sample = args.seq_length + 1
    for workers, rate in rates.items():
        print(
            f"loader ({workers} workers, micro-batch {step_config.micro_batch_size}, seq_length "
            f"{args.seq_length}): {rate:,.0f} samples/s = {rate * sample / 1e6:.2f}M tokens/s "
            f"= {rate / step_samples:,.0f}x what the training step below consumes"
        )
    print(
        f"training step ({args.step_config}, {gflops:.4f} GFLOP/token, fwd+bwd+ZeRO-2 AdamW, "
        f"1 process, CPU, median of {args.step_steps}): {step_samples:,.1f} samples/s"
    )
    print(
        "the loader keeps up with micro-batch steps down to "
        + " and ".join(
            f"{step_config.micro_batch_size / rate * 1e3:.2f} ms ({w} workers)"
            for w, rate in rates.items()
        )
    )
    # A GPU step consumes samples * seq_length * GFLOP/token at MFU * peak: the loader keeps
    # up with it while the MFU stays below this.
    print(
        f"on a GPU of {args.gpu_peak_tflops:g} TFLOP/s (bf16 dense peak), the loader keeps up "
        "with the step while its MFU stays below "
        + " and ".join(
            f"{rate * args.seq_length * gflops / (args.gpu_peak_tflops * 1e3):.1%} ({w} workers)"
            for w, rate in rates.items()
        )
    )


if __name__ == "__main__":
    run_cli(main)
