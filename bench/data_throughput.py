"""Data pipeline throughput: ``python bench/data_throughput.py --help``.

Side by side in one run, on the same text and the same number of cores:
- sentencepiece's own batch encode (``encode(texts, num_threads=cores)``) of every document,
- data_tools/shard.py end to end (``build_shards`` with ``--workers cores``: reading, decoding,
  splitting, tokenizing, packing, writing and checksumming the shards and the manifest),
- the loader reading the shards back (samples per second, ``num_workers`` 0 and ``cores``).
Runs alternate between the first two and report medians, because the box may be shared; the
CPU columns (CPU seconds per MB, all processes and threads) are what contention changes least.
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
from functools import partial
from typing import Optional

from vqmoe_megatron.data import DataError, Tokenizer, TokenShardLoader
from vqmoe_megatron.data.cli import available_cpus, run_cli
from vqmoe_megatron.data.sharding import ShardSettings, build_shards
from vqmoe_megatron.data.sources import iter_documents, resolve_inputs
from vqmoe_megatron.data.tokenizer_training import TokenizerSettings, train_tokenizer


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


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished child processes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(work: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and CPU seconds of ``work()``."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    work()
    return time.perf_counter() - wall, _cpu_seconds() - cpu


def _shard(settings: ShardSettings) -> None:
    shutil.rmtree(settings.output, ignore_errors=True)
    build_shards(settings, progress=False, log=lambda _: None)


def _loader_rate(data: Path, cores: int, batches: int, micro_batch_size: int) -> float:
    loader = TokenShardLoader(
        data,
        micro_batch_size=micro_batch_size,
        dp_rank=0,
        dp_size=1,
        num_workers=cores,
        seed=0,
    )
    stream = iter(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * micro_batch_size / (time.perf_counter() - start)


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
    p.add_argument("--cores", type=int, default=available_cpus())
    p.add_argument("--runs", type=int, default=3, help="alternating runs per measurement")
    p.add_argument("--loader-batches", type=int, default=2000)
    p.add_argument("--micro-batch-size", type=int, default=8)
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
                [str(source)], prefix, vocab_size=args.vocab_size, threads=args.cores
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
            settings = ShardSettings(
                [str(inputs)],
                model,
                str(work / "shards"),
                args.seq_length,
                shard_size_mb=args.shard_size_mb,
                workers=args.cores,
            )
            encode, shard = [], []
            for _ in range(args.runs):
                encode.append(
                    _timed(partial(tokenizer.processor.encode, texts, num_threads=args.cores))
                )
                shard.append(_timed(partial(_shard, settings)))
            medians = [statistics.median(x) for runs in (encode, shard) for x in zip(*runs)]
            rows.append((copies, len(sources), megabytes, *medians))
        rates = {
            workers: _loader_rate(
                work / "shards", workers, args.loader_batches, args.micro_batch_size
            )
            for workers in (0, args.cores)
        }
    print(
        f"input: {args.input}; tokenizer {tokenizer.vocab_size} pieces; seq_length "
        f"{args.seq_length}; {args.cores} cores; median of {args.runs} alternating runs; load "
        f"average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(
        "| input | sentencepiece encode MB/s | shard.py end to end MB/s | ratio | "
        "encode CPU s/MB | shard.py CPU s/MB | CPU ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for copies, files, megabytes, encode, encode_cpu, shard, shard_cpu in rows:
        print(
            f"| {copies}x ({files} files, {megabytes:.1f} MB) | {megabytes / encode:.1f} | "
            f"{megabytes / shard:.1f} | {encode / shard:.2f} | {encode_cpu / megabytes:.4f} | "
            f"{shard_cpu / megabytes:.4f} | {encode_cpu / shard_cpu:.2f} |"
        )
    for workers, rate in rates.items():
        print(
            f"loader ({workers} workers, micro-batch {args.micro_batch_size}, seq_length "
            f"{args.seq_length}): {rate:,.0f} samples/s = "
            f"{rate * (args.seq_length + 1) / 1e6:.2f}M tokens/s"
        )


if __name__ == "__main__":
    run_cli(main)
