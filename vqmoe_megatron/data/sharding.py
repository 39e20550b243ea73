"""Text -> token shards (the work behind data_tools/shard.py).

The main process cuts the inputs into chunks (``sources.iter_chunks``); worker processes decode,
tokenize and assign each document to train or valid by a seeded hash of its text (so the split is
deterministic, independent of file order and worker count, and duplicates land together); the
main process appends their ids to each split's ``StreamPacker`` and writes every full shard.
Resume: the chunk log says which chunk fed which stream positions, so a re-run starts tokenizing
at the first chunk still needed by an unfinished shard (see ``_resume_plan``). The same work split
over many machines (a slurm array job, then a merge) is in ``shard_parts``.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import multiprocessing
import platform
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from vqmoe_megatron.data.errors import DataError
from vqmoe_megatron.data.files import require_output_dir
from vqmoe_megatron.data.manifest import FORMAT, FORMAT_VERSION, SPLITS
from vqmoe_megatron.data.packing import StreamPacker
from vqmoe_megatron.data.shard_format import member_bytes, shard_name, shard_tar, token_dtype
from vqmoe_megatron.data.shard_workspace import ShardRecord, ShardWorkspace
from vqmoe_megatron.data.sources import (
    Chunk,
    DecodedChunk,
    Source,
    TextDocuments,
    byte_progress,
    decode_chunk,
    iter_chunks,
    resolve_inputs,
)
from vqmoe_megatron.data.tokenizer import Tokenizer
from vqmoe_megatron.processes import end_forked_children_with_this_process, end_with_parent

CHUNK_BYTES = 1 << 20
PACKING = (
    "per split one stream: EOS, then each document's ids followed by EOS; sample i = "
    "stream[i*S : i*S+S+1] (S = seq_length, consecutive samples overlap by one token); the last "
    "sample is padded with pad_id"
)


@dataclass
class ShardSettings:
    """Everything data_tools/shard.py was asked to do (written to the manifest as ``settings``)."""

    inputs: list[str]
    tokenizer: str
    output: str
    seq_length: int
    valid_fraction: float = 0.01
    split_seed: int = 1234
    shard_size_mb: float = 128.0
    text_documents: TextDocuments = "file"
    jsonl_field: str = "text"
    allow_invalid_text: bool = False
    workers: int = 1
    overwrite: bool = False


@dataclass
class ChunkResult:
    """What one chunk adds to each split (index 0 train, 1 valid): ids with EOS after each
    document, documents, UTF-8 bytes; plus empty documents skipped and characters replaced."""

    chunk: int
    source: int
    disk_bytes: int
    ids: tuple[np.ndarray, np.ndarray]
    documents: tuple[int, int]
    bytes: tuple[int, int]
    empty: int
    replaced: int

    def record(self) -> dict:
        """The chunk log line (everything but the ids)."""
        return {
            "chunk": self.chunk,
            "source": self.source,
            "tokens": [len(a) for a in self.ids],
            "documents": list(self.documents),
            "bytes": list(self.bytes),
            "empty": self.empty,
            "replaced": self.replaced,
        }


_WORKER: dict = {}


def _init_worker(model: str, sources: list[Source], settings: ShardSettings, dtype: str) -> None:
    end_with_parent()
    # Ctrl-C is the main process's to handle (it stops the pool); workers would only add
    # tracebacks to its one-line message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tokenizer = Tokenizer(model)
    _WORKER.update(
        tokenizer=tokenizer,
        sources=sources,
        settings=settings,
        dtype=np.dtype(dtype),
        split_hash=hashlib.sha256(settings.split_seed.to_bytes(8, "little", signed=True)),
        threshold=int(settings.valid_fraction * 2.0**64),
    )


def _tokenize_task(chunks: list[Chunk]) -> list[ChunkResult]:
    """Decode, split and tokenize the chunks of one pool task (runs in a worker process).

    All their documents go to sentencepiece in one batch call: each call starts and joins a
    thread of its own, and one call per file (932 calls on the 43 MB bench input) made the
    workers' encoding 10-15% dearer than the same text in one call. The ids come back as numpy
    arrays [n_ids] int32 filled in C++, a sixth cheaper than Python lists of ints.
    """
    w = _WORKER
    settings: ShardSettings = w["settings"]
    decoded = [
        decode_chunk(
            chunk,
            w["sources"][chunk.source],
            text_documents=settings.text_documents,
            jsonl_field=settings.jsonl_field,
            allow_invalid_text=settings.allow_invalid_text,
        )
        for chunk in chunks
    ]
    encoded = iter(
        w["tokenizer"].processor.encode(
            [text for d in decoded for text in d.texts],
            num_threads=1,
            add_eos=True,
            out_type="numpy",
        )
    )
    return [_chunk_result(chunk, d, encoded) for chunk, d in zip(chunks, decoded)]


def _chunk_result(
    chunk: Chunk, decoded: DecodedChunk, encoded: Iterator[np.ndarray]
) -> ChunkResult:
    """One chunk's result from its documents' ids (the next ``len(decoded.texts)`` arrays of
    ``encoded``): each document goes to train or valid by the seeded sha256 of its text."""
    w = _WORKER
    docs: tuple[list, list] = ([], [])
    sizes = [0, 0]
    for text in decoded.texts:
        data = text.encode("utf-8")
        digest = w["split_hash"].copy()
        digest.update(data)
        split = int(int.from_bytes(digest.digest()[:8], "little") < w["threshold"])
        docs[split].append(next(encoded))
        sizes[split] += len(data)
    return ChunkResult(
        chunk=chunk.index,
        source=chunk.source,
        disk_bytes=chunk.disk_bytes,
        ids=tuple(
            np.concatenate(d, dtype=w["dtype"], casting="unsafe") if d else np.zeros(0, w["dtype"])
            for d in docs
        ),
        documents=(len(docs[0]), len(docs[1])),
        bytes=(sizes[0], sizes[1]),
        empty=decoded.empty,
        replaced=decoded.replaced,
    )


def _tasks(
    chunks: Iterator[Chunk], restart: int, skipped: Callable[[Chunk], None]
) -> Iterator[list[Chunk]]:
    """Group the chunks from ``restart`` on into tasks of at least CHUNK_BYTES of input (chunks
    of small files are small; a task per chunk would cost more in IPC than the tokenizing)."""
    task: list[Chunk] = []
    size = 0
    for chunk in chunks:
        if chunk.index < restart:
            skipped(chunk)
            continue
        task.append(chunk)
        size += chunk.disk_bytes
        if size >= CHUNK_BYTES:
            yield task
            task, size = [], 0
    if task:
        yield task


@dataclass
class _Totals:
    """Counts summed over chunk records, per split and per source."""

    split: dict[str, dict[str, int]]
    source: list[dict[str, int]]

    @classmethod
    def empty(cls, sources: int) -> _Totals:
        return cls(
            split={s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS},
            source=[
                {"documents": 0, "empty_documents": 0, "replaced_characters": 0}
                for _ in range(sources)
            ],
        )

    def add(self, record: dict) -> None:
        for i, split in enumerate(SPLITS):
            for key in ("documents", "tokens", "bytes"):
                self.split[split][key] += record[key][i]
        source = self.source[record["source"]]
        source["documents"] += sum(record["documents"])
        source["empty_documents"] += record["empty"]
        source["replaced_characters"] += record["replaced"]


class SplitWriter:
    """Both splits' packers and finished shards: turns chunk results into staged shards."""

    def __init__(
        self,
        workspace: ShardWorkspace,
        tokenizer: Tokenizer,
        *,
        sources: int,
        seq_length: int,
        samples_per_shard: int,
        dtype: str,
        kept: list[dict],
        done: dict[str, int],
    ):
        self.workspace = workspace
        self.samples_per_shard = samples_per_shard
        self.totals = _Totals.empty(sources)
        for record in kept:
            self.totals.add(record)
        self.shards = {
            s: [workspace.valid[shard_name(s, k)] for k in range(done[s])] for s in SPLITS
        }
        self.packers = {
            split: StreamPacker(
                seq_length=seq_length,
                samples_per_shard=samples_per_shard,
                eos_id=tokenizer.eos_id,
                pad_id=tokenizer.pad_id,
                dtype=dtype,
                first_position=1 + self.totals.split[split]["tokens"],
                skip_until=done[split] * samples_per_shard * seq_length,
            )
            for split in SPLITS
        }

    def add(self, results: list[ChunkResult]) -> None:
        """Log the chunks, append their ids to the streams, stage every shard that fills up."""
        records = [result.record() for result in results]
        self.workspace.log_chunks(records)
        for record, result in zip(records, results):
            self.totals.add(record)
            for split, ids in zip(SPLITS, result.ids):
                self.append(split, ids)

    def append(self, split: str, ids: np.ndarray) -> None:
        """Append ids to one split's stream; stage every shard that fills up."""
        for samples in self.packers[split].add(ids):
            self._emit(split, samples)

    def finish(self) -> None:
        """Stage the last, padded shard of each split."""
        for split in SPLITS:
            for samples in self.packers[split].finish():
                self._emit(split, samples)

    def progress(self) -> str:
        """Tokens so far, shards written, and how full the train shard being filled is (a
        small corpus writes its only shard at the very end)."""
        tokens = sum(t["tokens"] for t in self.totals.split.values())
        written = sum(len(s) for s in self.shards.values())
        filling = self.packers["train"].filling
        return (
            f"{tokens:,} tokens, {written} shards written, "
            f"train shard {len(self.shards['train']) + 1} {filling:.0%} full"
        )

    def _emit(self, split: str, samples: np.ndarray) -> None:
        index = len(self.shards[split])
        data = shard_tar(samples, index * self.samples_per_shard)
        digest = hashlib.sha256(data).hexdigest()
        record = ShardRecord(shard_name(split, index), len(samples), len(data), digest)
        self.workspace.store_shard(record, data)
        self.shards[split].append(record)


def _resume_plan(
    chunks: list[dict], valid: dict[str, ShardRecord], samples_per_shard: int, seq_length: int
) -> tuple[int, dict[str, int]]:
    """First chunk to tokenize again, and per split how many leading shards are already done.

    Shard ``k`` of a split starts at stream position ``k * samples_per_shard * seq_length``; the
    chunk log gives the stream position after each chunk (position 0 is the leading EOS, which
    the packer adds itself). The run restarts at the earliest chunk that adds tokens at or past
    the start of the first unfinished shard of some split.
    """
    done, restart = {}, len(chunks)
    for i, split in enumerate(SPLITS):
        k = 0
        while shard_name(split, k) in valid:
            k += 1
        done[split] = k
        needed, end = k * samples_per_shard * seq_length, 1
        for c, record in enumerate(chunks):
            end += record["tokens"][i]
            if end > needed and record["tokens"][i]:
                restart = min(restart, c)
                break
    return restart, done


@dataclass(frozen=True)
class ShardPlan:
    """What the inputs and settings resolve to, before any tokenizing: the input files, the
    tokenizer, the id dtype, shard size and the identity (fingerprinted: what the content
    depends on)."""

    settings: ShardSettings
    sources: list[Source]
    tokenizer: Tokenizer
    dtype: str
    samples_per_shard: int
    identity: dict


def plan_shards(settings: ShardSettings) -> ShardPlan:
    """Check the settings, resolve the inputs and the tokenizer."""
    if (
        settings.seq_length < 1
        or not 0.0 <= settings.valid_fraction < 1.0
        or settings.workers < 1
        or not settings.shard_size_mb > 0
    ):
        raise DataError(
            f"need --seq-length >= 1, 0 <= --valid-fraction < 1, --workers >= 1 and "
            f"--shard-size-mb > 0 (got {settings.seq_length}, {settings.valid_fraction}, "
            f"{settings.workers}, {settings.shard_size_mb})"
        )
    require_output_dir("--output", settings.output)
    sources = resolve_inputs(settings.inputs)
    tokenizer = Tokenizer(settings.tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    samples_per_shard = max(
        1, int(settings.shard_size_mb * 2**20) // member_bytes(settings.seq_length + 1, dtype)
    )
    identity = {
        "format_version": FORMAT_VERSION,
        "tokenizer_sha256": tokenizer.sha256,
        "seq_length": settings.seq_length,
        "samples_per_shard": samples_per_shard,
        "valid_fraction": settings.valid_fraction,
        "split_seed": settings.split_seed,
        "text_documents": settings.text_documents,
        "jsonl_field": settings.jsonl_field,
        "chunk_bytes": CHUNK_BYTES,
        "sources": [[str(s.path), s.size, s.mtime_ns] for s in sources],
    }
    return ShardPlan(settings, sources, tokenizer, dtype, samples_per_shard, identity)


def open_writer(
    plan: ShardPlan, workspace: ShardWorkspace, kept: list[dict], done: dict[str, int]
) -> SplitWriter:
    """A SplitWriter into ``workspace`` that continues after ``kept`` chunks and ``done`` shards."""
    return SplitWriter(
        workspace,
        plan.tokenizer,
        sources=len(plan.sources),
        seq_length=plan.settings.seq_length,
        samples_per_shard=plan.samples_per_shard,
        dtype=plan.dtype,
        kept=kept,
        done=done,
    )


def tokenized(
    plan: ShardPlan,
    sources: list[Source],
    *,
    restart: int = 0,
    progress: bool = True,
    postfix: Callable[[], str] = str,
) -> Iterator[list[ChunkResult]]:
    """The results of ``sources``' chunks from ``restart`` on, in input order, tokenized by
    ``settings.workers`` processes (chunk and source numbers count within ``sources``)."""
    settings = plan.settings
    context = multiprocessing.get_context()
    end_forked_children_with_this_process()
    # Forked workers inherit this process's objects (torch's among them): frozen, their garbage
    # collector leaves them alone instead of touching, and so copying, every page they sit on.
    # (No gc.collect() first: with torch loaded it took 0.1-0.2 CPU-seconds per run.)
    gc.freeze()
    try:
        pool = context.Pool(
            settings.workers,
            initializer=_init_worker,
            initargs=(settings.tokenizer, sources, settings, plan.dtype),
        )
    finally:
        gc.unfreeze()
    with pool, byte_progress(sources, "sharding", progress) as bar:  # closed on errors too
        pending: deque = deque()
        chunks = iter_chunks(
            sources, text_documents=settings.text_documents, chunk_bytes=CHUNK_BYTES
        )

        def drain(limit: int) -> Iterator[list[ChunkResult]]:
            while len(pending) > limit:
                results = pending.popleft().get()
                yield results
                bar.update(sum(result.disk_bytes for result in results))
                bar.set_postfix_str(postfix(), refresh=False)

        for task in _tasks(chunks, restart, lambda chunk: bar.update(chunk.disk_bytes)):
            pending.append(pool.apply_async(_tokenize_task, (task,)))
            yield from drain(2 * settings.workers)
        yield from drain(0)


def check_documents(plan: ShardPlan, totals: _Totals) -> None:
    """Refuse inputs that held no document at all."""
    if sum(t["documents"] for t in totals.split.values()) == 0:
        empty = sum(s["empty_documents"] for s in totals.source)
        raise DataError(
            f"no documents in the inputs ({len(plan.sources)} file(s), {empty} empty "
            "document(s) skipped); pass files that contain text"
        )


def finish_shards(plan: ShardPlan, workspace: ShardWorkspace, writer: SplitWriter) -> dict:
    """Stage the last shards, write the manifest and move the set into place; the manifest."""
    check_documents(plan, writer.totals)
    writer.finish()
    manifest = _manifest(plan, workspace, writer.totals, writer.shards)
    workspace.commit(manifest)
    return manifest


def _manifest(
    plan: ShardPlan,
    workspace: ShardWorkspace,
    totals: _Totals,
    shards: dict[str, list[ShardRecord]],
) -> dict:
    settings, tokenizer = plan.settings, plan.tokenizer
    splits = {}
    for split in SPLITS:
        samples = sum(r.samples for r in shards[split])
        if samples != -(-totals.split[split]["tokens"] // settings.seq_length):
            raise RuntimeError(
                f"internal error: {split} has {samples} samples for {totals.split[split]}"
            )
        splits[split] = {
            **totals.split[split],
            "samples": samples,
            "shards": [dataclasses.asdict(r) for r in shards[split]],
        }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": workspace.fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": {
            "model": str(tokenizer.path.resolve()),
            "sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "pad_id": tokenizer.pad_id,
            "eos_id": tokenizer.eos_id,
            "bos_id": tokenizer.bos_id,
            "unk_id": tokenizer.unk_id,
            "sep_id": tokenizer.sep_id,
        },
        "seq_length": settings.seq_length,
        "sample_length": settings.seq_length + 1,
        "dtype": plan.dtype,
        "samples_per_shard": plan.samples_per_shard,
        "packing": PACKING,
        "splits": splits,
        "sources": [
            {"path": str(s.path), "size": s.size, **counts}
            for s, counts in zip(plan.sources, totals.source)
        ],
        "identity": workspace.identity,
        "settings": dataclasses.asdict(settings),
        "versions": {
            "sentencepiece": spm.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }


def build_shards(
    settings: ShardSettings, *, progress: bool = True, log: Callable[[str], None] = print
) -> dict:
    """Tokenize and shard ``settings.inputs`` into ``settings.output``; return the manifest.

    A re-run with the same inputs and settings verifies the existing shards and returns at once,
    or continues an interrupted run (see module docstring).
    """
    plan = plan_shards(settings)
    workspace = ShardWorkspace(
        Path(settings.output), plan.identity, overwrite=settings.overwrite, progress=progress
    )
    finished = workspace.up_to_date()
    if finished is not None:
        log(
            f"{settings.output} is up to date ({len(workspace.valid)} shards verified); nothing to do"
        )
        return finished
    chunk_log = workspace.resume()
    restart, done = _resume_plan(
        chunk_log, workspace.valid, plan.samples_per_shard, settings.seq_length
    )
    kept = chunk_log[:restart]
    if restart or any(done.values()):
        log(f"resuming: {sum(done.values())} shards done, re-reading from input chunk {restart}")
    workspace.start(kept)
    writer = open_writer(plan, workspace, kept, done)
    for results in tokenized(
        plan, plan.sources, restart=restart, progress=progress, postfix=writer.progress
    ):
        writer.add(results)
    return finish_shards(plan, workspace, writer)
