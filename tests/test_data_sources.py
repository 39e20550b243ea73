"""Reading raw text inputs: formats, compression, directories/globs and bad input."""

import bz2
import codecs
import gzip
import json
import lzma
import random
from pathlib import Path

import pytest
import zstandard

from vqmoe_megatron.data import DataError
from vqmoe_megatron.data.sources import iter_chunks, iter_documents, resolve_inputs


def _texts(paths, **kwargs) -> list[str]:
    sources = resolve_inputs([str(p) for p in paths])
    return [t for _, decoded in iter_documents(sources, **kwargs) for t in decoded.texts]


def test_every_format_and_compression(tmp_path: Path):
    docs = ["first document\nwith two lines\n", "zweites Dokument: äöü €", "third"]
    jsonl = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    (tmp_path / "a.txt").write_text(docs[0], encoding="utf-8")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(docs[1].encode()))
    (tmp_path / "c.text.xz").write_bytes(lzma.compress(docs[2].encode()))
    (tmp_path / "d.jsonl.bz2").write_bytes(bz2.compress(jsonl))
    (tmp_path / "e.ndjson.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    (tmp_path / "f.jsonl").write_bytes(jsonl)
    assert _texts([tmp_path]) == docs + docs * 3


def test_line_documents_and_custom_jsonl_field(tmp_path: Path):
    (tmp_path / "lines.txt").write_text("one\r\ntwo\n\n   \nthree", encoding="utf-8")
    (tmp_path / "x.jsonl").write_text('{"body": "b1"}\n\n{"body": "b2"}\n', encoding="utf-8")
    sources = resolve_inputs([str(tmp_path)])
    pairs = list(iter_documents(sources, text_documents="line", jsonl_field="body"))
    assert [t for _, d in pairs for t in d.texts] == ["one", "two", "three", "b1", "b2"]
    assert sum(d.empty for _, d in pairs) == 3


def test_directories_globs_sorted_and_hidden_files_skipped(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".cache").mkdir()
    for name in ["b.txt", "sub/a.txt", ".hidden.txt", ".cache/c.txt"]:
        (tmp_path / name).write_text(name, encoding="utf-8")
    paths = [s.path.name for s in resolve_inputs([str(tmp_path)])]
    assert paths == ["b.txt", "a.txt"]  # sorted by full path: <tmp>/b.txt < <tmp>/sub/a.txt
    globbed = resolve_inputs([str(tmp_path / "**" / "*.txt"), str(tmp_path / "b.txt")])
    assert [s.path.name for s in globbed] == ["b.txt", "a.txt"]


@pytest.mark.parametrize(
    "name, message",
    [("notes.csv", "unsupported file type"), ("data.json.gz", "unsupported file type")],
)
def test_unknown_file_type_is_an_error(tmp_path: Path, name: str, message: str):
    (tmp_path / "ok.txt").write_text("fine", encoding="utf-8")
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(DataError, match=message) as err:
        resolve_inputs([str(tmp_path)])
    assert name in str(err.value)


def test_missing_inputs_are_errors(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        resolve_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(DataError, match="matches no files"):
        resolve_inputs([str(tmp_path / "*.txt")])
    with pytest.raises(DataError, match="no input files"):
        resolve_inputs([str(tmp_path)])


def test_invalid_utf8_is_replaced_and_counted(tmp_path: Path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok \xff\xfe end \xef\xbf\xbd kept")
    sources = resolve_inputs([str(tmp_path)])
    [(_, decoded)] = list(iter_documents(sources, allow_invalid_text=True))
    assert decoded.texts == ["caf\ufffd ok \ufffd\ufffd end \ufffd kept"]
    assert decoded.replaced == 3  # the U+FFFD already in the file is not counted


@pytest.mark.parametrize("text_documents", ["file", "line"])
@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be", "utf-32", "utf-32-be"])
def test_byte_order_marks_select_the_encoding(tmp_path: Path, encoding: str, text_documents: str):
    marks = {"utf-16-be": codecs.BOM_UTF16_BE, "utf-32-be": codecs.BOM_UTF32_BE}

    def encode(text: str) -> bytes:  # Python writes no mark for an explicit byte order
        return marks.get(encoding, b"") + text.encode(encoding)

    text = "erste Zeile: äöü €\nzweite 𝄞\n"
    (tmp_path / "a.txt").write_bytes(encode(text))
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(encode(text)))
    jsonl = "".join(json.dumps({"text": line}) + "\n" for line in text.splitlines())
    (tmp_path / "c.jsonl").write_bytes(encode(jsonl))
    expected = [text] if text_documents == "file" else text.splitlines()
    pairs = list(iter_documents(resolve_inputs([str(tmp_path)]), text_documents=text_documents))
    assert [t for _, d in pairs for t in d.texts] == expected * 2 + text.splitlines()
    assert sum(d.replaced for _, d in pairs) == 0


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("x.txt", random.Random(0).randbytes(4096), "NUL characters"),
        ("utf16-no-mark.txt", "plain words".encode("utf-16-le"), "NUL characters"),
        ("latin1.txt", "Grüße aus Köln, Ça va?".encode("latin-1"), "invalid sequences"),
        ("x.jsonl", b'{"text": "ok"}\n{"text": "\xe9t\xe9"}\n', "characters in lines 1..2"),
    ],
)
@pytest.mark.parametrize("text_documents", ["file", "line"])
def test_binary_and_misencoded_files_are_refused_unless_allowed(
    tmp_path: Path, name: str, data: bytes, message: str, text_documents: str
):
    (tmp_path / name).write_bytes(data)
    sources = resolve_inputs([str(tmp_path)])
    with pytest.raises(DataError, match=message) as err:
        list(iter_documents(sources, text_documents=text_documents))
    assert name in str(err.value) and "--allow-invalid-text" in str(err.value)
    allowed = list(iter_documents(sources, text_documents=text_documents, allow_invalid_text=True))
    assert sum(d.replaced for _, d in allowed) > 0 or message == "NUL characters"


def test_a_few_invalid_bytes_in_much_text_are_replaced_not_refused(tmp_path: Path):
    (tmp_path / "a.txt").write_bytes(b"good text " * 100 + b"\xff" + b"more text " * 100)
    [(_, decoded)] = list(iter_documents(resolve_inputs([str(tmp_path)])))
    assert decoded.replaced == 1


def test_bad_jsonl_lines_name_file_and_line(tmp_path: Path):
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.jsonl:2: not valid JSON"):
        list(iter_documents(resolve_inputs([str(tmp_path)])))
    (tmp_path / "x.jsonl").write_text('{"body": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.jsonl:1: no 'text' field \(found: body\)"):
        list(iter_documents(resolve_inputs([str(tmp_path)])))


def test_truncated_compressed_file_is_an_error(tmp_path: Path):
    data = gzip.compress(b"some text " * 1000)
    (tmp_path / "cut.txt.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.txt\.gz: cannot read it"):
        list(iter_documents(resolve_inputs([str(tmp_path)])))


def test_chunks_are_deterministic_and_account_for_every_byte(tmp_path: Path):
    lines = "".join(f"line {i} " + "x" * (i % 50) + "\n" for i in range(3000))
    (tmp_path / "a.txt").write_text(lines, encoding="utf-8")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "t"}\n' * 5000))
    sources = resolve_inputs([str(tmp_path)])
    first = list(iter_chunks(sources, text_documents="line", chunk_bytes=10_000))
    second = list(iter_chunks(sources, text_documents="line", chunk_bytes=10_000))
    assert first == second and len(first) > 10
    assert [c.index for c in first] == list(range(len(first)))
    for number, source in enumerate(sources):
        mine = [c for c in first if c.source == number]
        assert sum(c.disk_bytes for c in mine) == source.size
        assert sum(len(c.records) for c in mine) == (3000 if number == 0 else 5000)
