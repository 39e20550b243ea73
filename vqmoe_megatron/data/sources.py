"""Raw text inputs: resolving paths, directories and globs to files, and reading their documents.

Supported files: ``.txt``/``.text`` (one document per file, or per line with
``text_documents="line"``) and ``.jsonl``/``.ndjson`` (one JSON object per line; the document is
its ``jsonl_field``), each optionally compressed as ``.gz``, ``.bz2``, ``.xz`` or ``.zst``.
Reading is split in two so that the expensive half runs in worker processes: ``iter_chunks``
(main process) cuts files into chunks of raw records; ``decode_chunk`` (any process) turns a
chunk into document texts, replacing invalid UTF-8 with U+FFFD and counting what it replaced.

Text is UTF-8; a byte order mark selects UTF-16 or UTF-32 instead (such a file is read whole,
one chunk) and a UTF-8 one is dropped. A chunk that holds NUL characters, or in which more than
``MAX_REPLACED_SHARE`` of the characters had to be replaced, is not text in UTF-8 (binary, or
another encoding such as Latin-1 or UTF-16 without a byte order mark): it is refused naming its
file, unless ``allow_invalid_text`` (``--allow-invalid-text``) asks to read it anyway.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import io
import json
import lzma
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, Optional

import zstandard
from tqdm import tqdm

from vqmoe_megatron.data.errors import DataError

TextDocuments = Literal["file", "line"]
KINDS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_SURROGATE = re.compile("[\ud800-\udfff]")
_REPLACEMENT = "\ufffd"
MAX_REPLACED_SHARE = 0.01
"""Largest share of a chunk's characters that may be invalid UTF-8 (replaced by U+FFFD)."""
_BOMS = (  # UTF-32 first: its little-endian mark starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


@dataclass(frozen=True)
class Source:
    """One input file: ``kind`` is "text" or "jsonl", ``compression`` a suffix or ""."""

    path: Path
    kind: str
    compression: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Chunk:
    """Raw records of one source (its lines), with their position; or, with ``records`` None, a
    whole file, left to ``decode_chunk`` to read (in a worker process): one document, or with a
    UTF-16/32 byte order mark the file's lines.

    ``first_record`` is the 0-based line index of ``records[0]`` within the source;
    ``disk_bytes`` is how many bytes of the file on disk this chunk accounts for (progress).
    """

    index: int
    source: int
    first_record: int
    records: Optional[list[bytes]]
    disk_bytes: int


@dataclass(frozen=True)
class DecodedChunk:
    """Non-empty document texts of a chunk, plus how many were empty and how many characters
    were replaced by U+FFFD (invalid UTF-8 bytes or lone surrogates)."""

    texts: list[str]
    empty: int
    replaced: int


def _source(path: Path) -> Source:
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS else ""
    kind_suffix = (suffixes[:-1] if compression else suffixes)[-1:] or [""]
    kind = KINDS.get(kind_suffix[0])
    if kind is None:
        raise DataError(
            f"{path}: unsupported file type; inputs must be {', '.join(KINDS)}, optionally "
            f"compressed ({', '.join(COMPRESSIONS)}): convert or rename it, or leave it out"
        )
    stat = path.stat()
    return Source(
        path=path, kind=kind, compression=compression, size=stat.st_size, mtime_ns=stat.st_mtime_ns
    )


def _expand(item: str) -> list[Path]:
    if glob.has_magic(item):
        matches = [Path(p) for p in glob.glob(item, recursive=True)]
        if not matches:
            raise DataError(
                f"input pattern '{item}' matches no files; check the pattern and quote it"
            )
        return [f for m in matches for f in _expand(str(m))]
    path = Path(item)
    if path.is_dir():
        return [
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
    if path.is_file():
        return [path]
    raise DataError(f"input '{item}' does not exist; pass text files, directories or glob patterns")


def resolve_inputs(inputs: Sequence[str]) -> list[Source]:
    """Files named by ``inputs`` (files, directories searched recursively, globs), sorted.

    Hidden files under a directory are skipped; any other file of an unknown type is an error.
    """
    if not inputs:
        raise DataError("no inputs given; pass text files, directories or glob patterns")
    paths = sorted({Path(os.path.abspath(p)) for item in inputs for p in _expand(item)})
    if not paths:
        raise DataError(f"no input files found in {', '.join(inputs)}")
    return [_source(p) for p in paths]


def byte_progress(sources: Sequence[Source], desc: str, enabled: bool) -> tqdm:
    """A progress bar over the sources' bytes on disk (shows MB/s and the ETA)."""
    return tqdm(
        total=sum(s.size for s in sources),
        unit="B",
        unit_scale=True,
        desc=desc,
        disable=not enabled,
    )


def _open(source: Source, raw: BinaryIO) -> BinaryIO:
    if source.compression == ".gz":
        return gzip.GzipFile(fileobj=raw)
    if source.compression == ".bz2":
        return bz2.BZ2File(raw)
    if source.compression == ".xz":
        return lzma.LZMAFile(raw)
    if source.compression == ".zst":
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    return raw


def _read_error(source: Source, exc: Exception) -> DataError:
    return DataError(f"{source.path}: cannot read it ({exc}); check that the file is complete")


def iter_chunks(
    sources: Sequence[Source], *, text_documents: TextDocuments = "file", chunk_bytes: int = 1 << 20
) -> Iterator[Chunk]:
    """Cut the sources, in order, into chunks of about ``chunk_bytes`` uncompressed bytes.

    A chunk never spans two files. The chunking depends only on the files and ``chunk_bytes``,
    so a resumed run sees the same chunks with the same indices.
    """
    index = 0
    for number, source in enumerate(sources):
        if (source.kind == "text" and text_documents == "file") or _wide_encoding(source):
            yield Chunk(index, number, 0, None, source.size)
            index += 1
            continue
        with open(source.path, "rb") as raw:
            stream = _open(source, raw)
            try:
                records: list[bytes] = []
                size = first = counted = 0
                for line_number, line in enumerate(stream):
                    if not records:
                        first = line_number
                    records.append(line)
                    size += len(line)
                    if size >= chunk_bytes:
                        position = raw.tell()
                        yield Chunk(index, number, first, records, position - counted)
                        index, records, size, counted = index + 1, [], 0, position
                if records or counted < source.size:
                    yield Chunk(index, number, first, records, source.size - counted)
                    index += 1
            except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as exc:
                raise _read_error(source, exc) from exc


def _bom(data: bytes) -> tuple[str, int]:
    """The encoding a byte order mark at the start of ``data`` selects (UTF-8 without one) and
    the mark's length."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return encoding, len(bom)
    return "utf-8", 0


def _wide_encoding(source: Source) -> bool:
    """Whether the source starts with a UTF-16 or UTF-32 byte order mark."""
    try:
        with open(source.path, "rb") as raw:
            head = _open(source, raw).read(4)
    except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as exc:
        raise _read_error(source, exc) from exc
    return _bom(head)[0] != "utf-8"


def read_whole(source: Source) -> bytes:
    """The uncompressed content of a source."""
    try:
        with open(source.path, "rb") as raw:
            return _open(source, raw).read()
    except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as exc:
        raise _read_error(source, exc) from exc


def decode_text(data: bytes, encoding: str = "utf-8") -> tuple[str, int]:
    """``data`` as text, invalid sequences replaced by U+FFFD; also the number of replacements
    (a U+FFFD already in ``data`` is not one)."""
    try:
        return data.decode(encoding), 0
    except UnicodeDecodeError:
        text = data.decode(encoding, errors="replace")
        kept = data.decode(encoding, errors="ignore").count(_REPLACEMENT)
        return text, text.count(_REPLACEMENT) - kept


def _whole_file_records(source: Source, text_documents: TextDocuments) -> tuple[list[str], int]:
    """A whole-file chunk's records (the document, or its lines with their line ends), decoded
    by its byte order mark; also the number of replaced characters."""
    data = read_whole(source)
    encoding, mark = _bom(data)
    text, replaced = decode_text(data[mark:], encoding)
    if source.kind == "text" and text_documents == "file":
        return [text], replaced
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else []), replaced


def _refuse_invalid(source: Source, line: Optional[int], reason: str) -> DataError:
    where = f"{source.path}:{line + 1}" if line is not None else str(source.path)
    return DataError(
        f"{where}: {reason}, so it is not UTF-8 text (binary, or another encoding such as "
        "Latin-1 or UTF-16 without a byte order mark); convert it to UTF-8 (iconv -f "
        "<its encoding> -t UTF-8), leave it out, or pass --allow-invalid-text to read it anyway with "
        "invalid bytes replaced by U+FFFD"
    )


def _json_text(line: str, source: Source, line_number: int, field: str) -> str:
    where = f"{source.path}:{line_number + 1}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc}); fix or remove that line") from exc
    if not isinstance(obj, dict) or field not in obj:
        keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(
            f"{where}: no '{field}' field (found: {keys}); pass --jsonl-field with the name of "
            "the text field"
        )
    if not isinstance(obj[field], str):
        raise DataError(f"{where}: '{field}' is {type(obj[field]).__name__}, not a string")
    return obj[field]


def decode_chunk(
    chunk: Chunk,
    source: Source,
    *,
    text_documents: TextDocuments = "file",
    jsonl_field: str = "text",
    allow_invalid_text: bool = False,
) -> DecodedChunk:
    """Document texts of a chunk; documents that are empty or only whitespace are dropped.

    Raises DataError for a chunk that is not text (NUL characters, or more than
    ``MAX_REPLACED_SHARE`` of it replaced) unless ``allow_invalid_text``."""
    texts: list[str] = []
    empty = replaced = characters = 0
    if chunk.records is None:
        lines, replaced = _whole_file_records(source, text_documents)
        decoded = [(line, 0) for line in lines]
    else:
        decoded = [decode_text(record) for record in chunk.records]
        if chunk.first_record == 0 and decoded and decoded[0][0].startswith("\ufeff"):
            decoded[0] = (decoded[0][0][1:], decoded[0][1])  # a UTF-8 byte order mark
    by_line = not (source.kind == "text" and text_documents == "file")
    for offset, (text, bad) in enumerate(decoded):
        characters += len(text)
        if "\x00" in text and not allow_invalid_text:
            line = chunk.first_record + offset if by_line else None
            raise _refuse_invalid(source, line, "it holds NUL characters")
        if source.kind == "jsonl":
            if not text.strip():
                empty += 1
                continue
            text = _json_text(text, source, chunk.first_record + offset, jsonl_field)
            text, surrogates = _SURROGATE.subn(_REPLACEMENT, text)
            bad += surrogates
        elif text_documents == "line":
            text = text.rstrip("\r\n")
        replaced += bad
        if text.strip():
            texts.append(text)
        else:
            empty += 1
    if replaced > MAX_REPLACED_SHARE * max(characters, 1) and not allow_invalid_text:
        first = chunk.first_record + 1
        lines = f" in lines {first}..{first + len(decoded) - 1}" if by_line else ""
        raise _refuse_invalid(
            source, None, f"{replaced} of {characters} characters{lines} are invalid sequences"
        )
    return DecodedChunk(texts, empty, replaced)


def iter_documents(
    sources: Sequence[Source],
    *,
    text_documents: TextDocuments = "file",
    jsonl_field: str = "text",
    allow_invalid_text: bool = False,
) -> Iterator[tuple[Chunk, DecodedChunk]]:
    """Decode every chunk in this process (for tools that read serially, like tokenizer training)."""
    for chunk in iter_chunks(sources, text_documents=text_documents):
        source = sources[chunk.source]
        yield (
            chunk,
            decode_chunk(
                chunk,
                source,
                text_documents=text_documents,
                jsonl_field=jsonl_field,
                allow_invalid_text=allow_invalid_text,
            ),
        )
