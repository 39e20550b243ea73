"""``python -m vqmoe_megatron.evaluate`` / ``vqmoe-evaluate``: loss, perplexity and bits per byte
of a checkpoint, with per-layer routing statistics, in either routing mode.

    vqmoe-evaluate --checkpoint RUN --data-dir SHARDS [SHARDS ...] [--split valid]
    vqmoe-evaluate --checkpoint RUN --text a.txt b.txt [--tokenizer tokenizer.model]
    vqmoe-evaluate --checkpoint CKPT_A --fluctuation CKPT_B [...] --data-dir SHARDS
    vqmoe-evaluate --checkpoint RUN --fluctuation --text a.txt   (consecutive checkpoints)
    torchrun --nproc_per_node N -m vqmoe_megatron.evaluate ... --tensor-parallel T --expert-parallel E

Held-out shards are scored as in training: every target of every packed sample, padding
excluded; bits per byte uses the split's bytes per token from the manifest (exact over a whole
split; ``--max-batches`` scales it by the tokens scored). Several ``--data-dir`` (the sources of
a blended run, say) are scored one after another, each on its own; the JSON then lists them
under ``sources``. A shard directory may be a path, an http(s):// prefix or a pipe: template.

Text files are scored as lm-evaluation-harness' ``loglikelihood_rolling`` does (so the
``vqmoe_text`` task gives the same number, see :mod:`vqmoe_megatron.eval_tasks`): each file is one
document, encoded without BOS/EOS; the first token is predicted from a single EOS (the document
separator of the training data); the tokens are scored in consecutive chunks of ``seq_length``,
each predicted from the ``seq_length`` tokens before its last one (the first chunk from EOS and
the chunk itself, the last, shorter chunk with the preceding tokens as extra context). Bits per
byte = total NLL / ln 2 / UTF-8 bytes of the files.

``--fluctuation`` reports routing fluctuation (:mod:`vqmoe_megatron.moe.fluctuation`) instead:
the share of the held-out tokens (the first ``--max-batches`` batches of the first data
source, padding excluded) whose top-1 expert differs between two checkpoints, per MoE layer and
overall; each checkpoint routes in ``--routing`` (default: its own mode).
"""

from __future__ import annotations

from vqmoe_megatron.interrupt import guard_startup, run

if __name__ == "__main__":
    guard_startup()  # Ctrl-C during the imports below: one line, exit 130

import argparse
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

import torch

from vqmoe_megatron.config import ROUTING_MODES
from vqmoe_megatron.console import fail, quiet_third_party_warnings

ROUTING_COLUMNS = (
    ("tokens", "tokens", "{:.0f}"),
    ("rows/token", "rows_per_token", "{:.3f}"),
    ("imbalance", "imbalance", "{:.3f}"),
    ("dead exp", "dead_experts", "{:.0f}"),
    ("code ppl", "code_perplexity", "{:.2f}"),
    ("dead", "dead_codes", "{:.0f}"),
    ("router H", "router_entropy", "{:.3f}"),
    ("agree", "agreement", "{:.3f}"),
    ("gate_d", "gate_discrete", "{:.3f}"),
)


def rolling_windows(tokens: list[int], prefix: int, length: int) -> list[tuple[list[int], int]]:
    """lm-eval's rolling windows (``context_len=1``) of one document.

    Returns ``(window, scored)`` pairs: ``window`` holds at most ``length + 1`` ids of
    ``[prefix] + tokens``, inputs ``window[:-1]``, targets ``window[1:]``, of which the last
    ``scored`` count. Every token is scored exactly once.
    """
    stream = [prefix, *tokens]
    windows = []
    start = 0
    while start < len(tokens):
        end = min(start + length, len(tokens))
        windows.append((stream[max(0, end - length) : end + 1], end - start))
        start = end
    return windows


def window_batches(
    windows: list[tuple[list[int], int]], batch_size: int, pad_id: int, length: int
) -> Iterator[dict]:
    """Batches ``{"tokens": [B, length + 1], "loss_mask": [B, length]}``, right-padded with
    ``pad_id`` (a fixed length, as in training: sequence parallelism splits it over TP)."""
    width = length + 1
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        tokens = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width - 1), dtype=torch.long)
        for row, (window, scored) in enumerate(chunk):
            tokens[row, : len(window)] = torch.tensor(window)
            mask[row, len(window) - 1 - scored : len(window) - 1] = 1
        yield {"tokens": tokens, "loss_mask": mask}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqmoe-evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="run, step or consolidated")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--data-dir",
        nargs="+",
        help="shards of data_tools/shard.py (path, http(s):// prefix or pipe: template); several "
        "are scored each on its own",
    )
    data.add_argument("--text", type=Path, nargs="+", help="raw UTF-8 text files")
    parser.add_argument("--split", default="valid", help="shard split (default: valid)")
    parser.add_argument("--routing", choices=ROUTING_MODES, default=None)
    parser.add_argument("--tokenizer", type=Path, default=None, help="for --text (default: run's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=None, help="per rank")
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--expert-parallel", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--fluctuation",
        type=Path,
        nargs="*",
        default=None,
        metavar="CKPT",
        help="routing fluctuation instead of loss: the share of the held-out tokens whose top-1 "
        "expert differs between --checkpoint and CKPT, or, with no CKPT, between consecutive "
        "checkpoints of the run --checkpoint (one process)",
    )
    return parser


def _shard_batches(data_dir: str, args: argparse.Namespace, cfg, dp_rank: int, dp_size: int):
    """(batches, pad id, bytes per scored token) of a shard split."""
    from vqmoe_megatron.data import TokenShardLoader, check_manifest_matches, load_manifest

    manifest = load_manifest(data_dir)
    check_manifest_matches(
        manifest, vocab_size=cfg.model.vocab_size, seq_length=cfg.model.seq_length
    )
    split = manifest.split(args.split)
    loader = TokenShardLoader(
        manifest,
        args.split,
        micro_batch_size=args.batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=0,
        seed=0,
        shuffle=False,
        infinite=False,
    )
    return loader, manifest.pad_id, split.bytes / max(split.tokens, 1)


def _text_batches(args: argparse.Namespace, source, dp_rank: int, dp_size: int):
    """(batches, pad id, UTF-8 bytes of all files) of the rolling windows of text files."""
    from vqmoe_megatron.data import DataError
    from vqmoe_megatron.eval_tasks.text_files import read_document

    tokenizer = source.tokenizer
    windows = []
    num_bytes = 0
    for path in args.text:
        try:
            text = read_document(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read text file {path}: {exc}") from exc
        num_bytes += len(text.encode("utf-8"))
        windows += rolling_windows(
            tokenizer.encode(text), tokenizer.eos_id, source.cfg.model.seq_length
        )
    batches = window_batches(
        windows[dp_rank::dp_size], args.batch_size, tokenizer.pad_id, source.cfg.model.seq_length
    )
    return batches, tokenizer.pad_id, num_bytes


def evaluate(args: argparse.Namespace) -> dict:
    """Build, load and evaluate (collective); the result dict of every rank is the same."""
    from megatron.core import parallel_state

    from vqmoe_megatron.convert.source import load_model, open_source, with_layout
    from vqmoe_megatron.distributed import init_distributed
    from vqmoe_megatron.training.evaluation import (
        all_reduce_sum,
        filler_batch,
        lm_metrics,
        sum_nll,
    )
    from vqmoe_megatron.training.language_model import LanguageModel

    source = open_source(args.checkpoint, args.tokenizer, require_tokenizer=args.text is not None)
    routing = args.routing or source.cfg.moe.routing_mode
    cfg = with_layout(source.cfg, args.tensor_parallel, args.expert_parallel, routing)
    layout = init_distributed(args.tensor_parallel, args.expert_parallel)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    if args.text is not None:
        scored = [("text", *_text_batches(args, source, dp_rank, dp_size))]
    else:
        scored = [
            (data_dir, *_shard_batches(data_dir, args, cfg, dp_rank, dp_size))
            for data_dir in args.data_dir
        ]
    gpt = load_model(source, cfg)
    device = next(gpt.parameters()).device
    results = []
    for data, batches, pad_id, bytes_info in scored:
        gpt.routing_metrics.reset()
        nll, count = sum_nll(
            LanguageModel(gpt, pad_id),
            batches,
            device,
            filler_batch(pad_id, cfg.model.seq_length),
            args.max_batches,
        )
        nll, count = all_reduce_sum([nll, count], device, parallel_state.get_data_parallel_group())
        num_bytes = bytes_info if args.text is not None else count * bytes_info
        results.append(
            {
                "data": [str(p) for p in args.text] if args.text else f"{data}:{args.split}",
                **lm_metrics(nll, count, num_bytes),
                "bytes": num_bytes,
                "layers": gpt.routing_metrics.summarize(),
            }
        )
    run = {"checkpoint": source.description, "routing": routing, "layout": layout.describe()}
    return {**run, **results[0]} if len(results) == 1 else {**run, "sources": results}


def _checkpoint_pairs(args: argparse.Namespace) -> list[tuple[Path, Path]]:
    """The (before, after) checkpoints of ``--fluctuation``: the two given, or every pair of
    consecutive complete ``step_*`` checkpoints of the run (or checkpoints directory) given."""
    from vqmoe_megatron.checkpoint.training import complete_checkpoints

    if args.fluctuation:
        return [(args.checkpoint, after) for after in args.fluctuation]
    root = args.checkpoint / "checkpoints"
    root = root if root.is_dir() else args.checkpoint
    steps = complete_checkpoints(root) if root.is_dir() else []
    if len(steps) < 2:
        raise ValueError(
            f"--fluctuation without CKPT needs a run with at least two complete checkpoints; "
            f"{args.checkpoint} has {len(steps)} (or give --fluctuation CKPT)"
        )
    return list(zip(steps[:-1], steps[1:]))


def evaluate_fluctuation(args: argparse.Namespace) -> dict:
    """Routing fluctuation between checkpoint pairs on one fixed held-out token set (the first
    ``--max-batches`` batches of the data, padding excluded); one process."""
    import itertools

    from vqmoe_megatron.convert.source import load_model, open_source, with_layout
    from vqmoe_megatron.distributed import init_distributed
    from vqmoe_megatron.moe.fluctuation import Top1Recorder, count_changes, fluctuation

    pairs = _checkpoint_pairs(args)
    init_distributed(1, 1)
    first = open_source(pairs[0][0], args.tokenizer, require_tokenizer=args.text is not None)
    if args.text is not None:
        batches, pad_id, _ = _text_batches(args, first, 0, 1)
        data = [str(p) for p in args.text]
    else:
        cfg = with_layout(first.cfg, 1, 1, args.routing)
        batches, pad_id, _ = _shard_batches(args.data_dir[0], args, cfg, 0, 1)
        data = f"{args.data_dir[0]}:{args.split}"
    tokens = [b["tokens"][:, :-1] for b in itertools.islice(batches, args.max_batches)]
    records: dict[Path, dict] = {}

    def top1(path: Path) -> dict:
        if path not in records:
            source = open_source(path)
            cfg = with_layout(source.cfg, 1, 1, args.routing or source.cfg.moe.routing_mode)
            gpt = load_model(source, cfg)
            device = next(gpt.parameters()).device
            with torch.no_grad(), Top1Recorder(gpt) as recorder:
                for inputs in tokens:
                    recorder.mark_padding((inputs == pad_id).t())
                    gpt(inputs.to(device), None, None)
            records[path] = {"checkpoint": source.description, "top1": recorder.assignments()}
        return records[path]

    results = []
    for before, after in pairs:
        a, b = top1(before), top1(after)
        shares = fluctuation(count_changes(a["top1"], b["top1"]))
        results.append({"before": a["checkpoint"], "after": b["checkpoint"], **shares})
    return {"data": data, "routing": args.routing, "fluctuation": results}


def format_fluctuation(result: dict) -> str:
    """One line per checkpoint pair: overall and per-layer fluctuation."""
    lines = [
        f"routing fluctuation on {result['data']} (share of tokens whose top-1 expert changes)"
    ]
    for pair in result["fluctuation"]:
        layers = " ".join(f"layer{k} {v:.4f}" for k, v in sorted(pair["layers"].items()))
        lines.append(
            f"{pair['before']} -> {pair['after']}: overall {pair['overall']:.4f} | {layers} | "
            f"tokens {pair['tokens']}"
        )
    return "\n".join(lines)


def format_result(result: dict) -> str:
    """The headline numbers and a per-layer routing table (per source, for several)."""
    if "sources" in result:
        run = {k: v for k, v in result.items() if k != "sources"}
        return "\n\n".join(format_result({**run, **scored}) for scored in result["sources"])
    lines = [
        f"{result['checkpoint']} ({result['routing']} routing) on {result['data']}",
        f"loss {result['loss']:.4f} | ppl {result['ppl']:.3f} | bpb {result['bpb']:.4f} | "
        f"tokens {result['tokens']:.0f} | bytes {result['bytes']:.0f}",
    ]
    if result["layers"]:
        lines.append("layer " + " ".join(f"{title:>10}" for title, _, _ in ROUTING_COLUMNS))
        for layer, stats in sorted(result["layers"].items()):
            cells = [
                f"{fmt.format(stats[key]):>10}" if key in stats else f"{'-':>10}"
                for _, key, fmt in ROUTING_COLUMNS
            ]
            lines.append(f"{layer:>5} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``vqmoe-evaluate``; returns the exit code (2 with one ``error:`` line)."""
    quiet_third_party_warnings()
    args = _parser().parse_args(argv)
    if args.batch_size < 1 or (args.max_batches is not None and args.max_batches < 1):
        return fail("--batch-size and --max-batches must be at least 1")
    if min(args.tensor_parallel, args.expert_parallel) < 1:
        return fail("--tensor-parallel and --expert-parallel must be at least 1")
    if args.json is not None and (args.json.is_dir() or not args.json.parent.is_dir()):
        return fail(f"--json {args.json}: give a file in an existing directory")
    from vqmoe_megatron.checkpoint.errors import CheckpointError
    from vqmoe_megatron.config import ConfigError
    from vqmoe_megatron.data import DataError
    from vqmoe_megatron.distributed import destroy_distributed

    fluctuating = args.fluctuation is not None
    if fluctuating and (
        max(args.tensor_parallel, args.expert_parallel) > 1
        or int(os.environ.get("WORLD_SIZE", 1)) > 1
    ):
        return fail("--fluctuation runs in one process: drop torchrun and the parallel sizes")
    try:
        result = evaluate_fluctuation(args) if fluctuating else evaluate(args)
        rank = torch.distributed.get_rank()
    except (CheckpointError, ConfigError, DataError, ValueError) as exc:
        return fail(str(exc))
    finally:
        destroy_distributed()
    if rank == 0:
        print(format_fluctuation(result) if fluctuating else format_result(result))
        if args.json is not None:
            try:
                args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            except OSError as exc:
                return fail(f"cannot write --json {args.json}: {exc.strerror}")
    return 0


if __name__ == "__main__":
    run(main)
