"""Training a sentencepiece model for the pipeline (the work behind data_tools/train_tokenizer.py).

Defaults aim at exact round trips, which make bits per byte exact: ``identity`` normalization,
whitespace kept as is, byte fallback for characters outside the vocabulary (newlines included),
so ``decode(encode(text)) == text``. Ids 0-3 are ``<unk>``, ``<s>``, ``</s>``, ``<pad>``, and
``<sep>`` (sentence pairs) is the next control symbol; none of them is ever produced from text.
"""

from __future__ import annotations

import dataclasses
import io
import math
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import sentencepiece as spm

from vqmoe_megatron.data.errors import DataError
from vqmoe_megatron.data.files import require_output_dir, write_bytes_atomic, write_json_atomic
from vqmoe_megatron.data.sources import (
    Source,
    TextDocuments,
    byte_progress,
    iter_documents,
    resolve_inputs,
)
from vqmoe_megatron.data.tokenizer import (
    BOS_PIECE,
    EOS_PIECE,
    PAD_PIECE,
    SEP_PIECE,
    UNK_PIECE,
    Tokenizer,
)


@dataclass
class TokenizerSettings:
    """Everything that determines the trained model (written to ``<prefix>.json``)."""

    inputs: list[str]
    output_prefix: str
    vocab_size: int = 32000
    model_type: Literal["unigram", "bpe"] = "unigram"
    character_coverage: float = 0.9995
    byte_fallback: bool = True
    sample_sentences: int = 2_000_000
    """Train on a uniform random sample of this many sentences (0: all of them)."""
    max_sentence_bytes: int = 4192
    """Longer lines are cut at spaces into pieces of at most this many UTF-8 bytes."""
    normalization: Literal["identity", "nmt_nfkc", "nfkc"] = "identity"
    split_digits: bool = False
    text_documents: TextDocuments = "file"
    jsonl_field: str = "text"
    allow_invalid_text: bool = False
    seed: int = 1234
    threads: int = 1
    overwrite: bool = False


@dataclass
class _Counts:
    documents: int = 0
    empty_documents: int = 0
    replaced_characters: int = 0
    sentences: int = 0
    replaced_per_source: dict[int, int] = dataclasses.field(default_factory=dict)
    error: Optional[DataError] = None


def cut_line(line: str, max_bytes: int) -> Iterator[str]:
    """Pieces of ``line`` of at most ``max_bytes`` UTF-8 bytes, cut at spaces where possible."""
    data = line.encode("utf-8")
    while len(data) > max_bytes:
        cut = data.rfind(b" ", 0, max_bytes)
        if cut <= 0:
            cut = max_bytes
            while data[cut] & 0xC0 == 0x80:
                cut -= 1
        yield data[:cut].decode("utf-8")
        data = data[cut:]
    if data:
        yield data.decode("utf-8")


def _sentences(
    sources: list[Source], settings: TokenizerSettings, counts: _Counts, progress: bool
) -> Iterator[str]:
    """Non-empty lines of every document; DataErrors are kept for the caller (sentencepiece
    would turn them into a RuntimeError)."""
    bar = byte_progress(sources, "reading", progress)
    try:
        for chunk, decoded in iter_documents(
            sources,
            text_documents=settings.text_documents,
            jsonl_field=settings.jsonl_field,
            allow_invalid_text=settings.allow_invalid_text,
        ):
            counts.documents += len(decoded.texts)
            counts.empty_documents += decoded.empty
            counts.replaced_characters += decoded.replaced
            replaced = counts.replaced_per_source
            replaced[chunk.source] = replaced.get(chunk.source, 0) + decoded.replaced
            for text in decoded.texts:
                for line in text.split("\n"):
                    if line.strip():
                        for piece in cut_line(line, settings.max_sentence_bytes):
                            counts.sentences += 1
                            yield piece
            bar.update(chunk.disk_bytes)
    except DataError as exc:
        counts.error = exc
        raise
    finally:
        bar.close()


def model_paths(output_prefix: str) -> tuple[Path, Path]:
    """``<prefix>.model`` and ``<prefix>.json``."""
    return Path(output_prefix + ".model"), Path(output_prefix + ".json")


def train_tokenizer(settings: TokenizerSettings, *, progress: bool = True) -> dict:
    """Train, write ``<prefix>.model`` and ``<prefix>.json``; return the JSON's content."""
    limits = {  # option: (value, lowest, highest, why)
        "--vocab-size": (settings.vocab_size, 6, math.inf, "5 special pieces and one more"),
        "--character-coverage": (settings.character_coverage, 0.98, 1, "sentencepiece's range"),
        "--threads": (settings.threads, 1, math.inf, "at least one"),
        "--max-sentence-bytes": (settings.max_sentence_bytes, 4, math.inf, "any character"),
        "--sample-sentences": (settings.sample_sentences, 0, math.inf, "0: all sentences"),
    }
    for option, (value, low, high, why) in limits.items():
        if not low <= value <= high:
            bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
            raise DataError(f"{option} {value}: use a value {bounds} ({why})")
    if 0 < settings.sample_sentences <= 100:
        raise DataError(
            f"--sample-sentences {settings.sample_sentences} is too small: sentencepiece needs "
            "more than 100 (or 0 for all sentences)"
        )
    model_path, json_path = model_paths(settings.output_prefix)
    if model_path.exists() and not settings.overwrite:
        raise DataError(
            f"{model_path} exists; pass --overwrite to replace it (shards made with it will then "
            "no longer match) or choose another --output-prefix"
        )
    require_output_dir("--output-prefix", model_path.parent)
    sources = resolve_inputs(settings.inputs)
    counts = _Counts()
    writer = io.BytesIO()
    spm.set_random_generator_seed(settings.seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(sources, settings, counts, progress),
            model_writer=writer,
            vocab_size=settings.vocab_size,
            model_type=settings.model_type,
            character_coverage=settings.character_coverage,
            byte_fallback=settings.byte_fallback,
            input_sentence_size=settings.sample_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=settings.max_sentence_bytes,
            normalization_rule_name=settings.normalization,
            remove_extra_whitespaces=False,
            split_digits=settings.split_digits,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=UNK_PIECE,
            bos_piece=BOS_PIECE,
            eos_piece=EOS_PIECE,
            pad_piece=PAD_PIECE,
            control_symbols=[SEP_PIECE],
            num_threads=settings.threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        if counts.error is not None:
            raise counts.error from None
        if counts.sentences == 0:
            raise DataError(
                f"no text in the inputs ({len(sources)} files, {counts.empty_documents} empty "
                "documents); pass files that contain text"
            ) from exc
        raise DataError(f"sentencepiece could not train on the inputs: {exc}".strip()) from exc
    write_bytes_atomic(model_path, writer.getvalue())
    tokenizer = Tokenizer(model_path)
    info = {
        "model": str(model_path.resolve()),
        "sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "special_ids": {
            "unk": tokenizer.unk_id,
            "bos": tokenizer.bos_id,
            "eos": tokenizer.eos_id,
            "pad": tokenizer.pad_id,
            "sep": tokenizer.sep_id,
        },
        "settings": dataclasses.asdict(settings),
        "inputs": [
            {
                "path": str(s.path),
                "size": s.size,
                "replaced_characters": counts.replaced_per_source.get(number, 0),
            }
            for number, s in enumerate(sources)
        ],
        "corpus": {
            "documents": counts.documents,
            "empty_documents": counts.empty_documents,
            "replaced_characters": counts.replaced_characters,
            "sentences": counts.sentences,
            "sentences_used": min(counts.sentences, settings.sample_sentences or counts.sentences),
        },
        "versions": {"sentencepiece": spm.__version__, "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(json_path, info)
    return info
