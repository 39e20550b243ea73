"""Tokenizer training (train_tokenizer.py) and the Tokenizer wrapper the trainer relies on."""

import hashlib
import json
from pathlib import Path

import pytest
from data_helpers import FIXTURE, fixture_documents, run_tool, tiny_tokenizer

from vqmoe_megatron.data import DataError, Tokenizer
from vqmoe_megatron.data.tokenizer_training import TokenizerSettings, cut_line, train_tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_tokenizer(tmp_path_factory)


def test_special_tokens_and_settings_json(model: Path):
    tok = Tokenizer(model)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.sep_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == 400
    assert tok.sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
    info = json.loads(model.with_suffix(".json").read_text())
    assert info["sha256"] == tok.sha256 and info["vocab_size"] == 400
    assert info["special_ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": 3, "sep": 4}
    assert info["settings"]["vocab_size"] == 400 and info["settings"]["byte_fallback"] is True
    assert info["corpus"]["documents"] == len(fixture_documents())
    # Special pieces typed as text are text, never the control ids.
    ids = tok.encode("<pad> <sep> </s> <s>")
    assert not {0, 1, 2, 3, 4} & set(ids)


def test_round_trip_is_exact(model: Path):
    tok = Tokenizer(model)
    for text in list(fixture_documents().values()) + ["  two  spaces\n\ttab\r\n", "ü ß 中文 🎉 —"]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("hello")
    assert tok.decode(ids + [tok.pad_id] * 3) == "hello"  # pad is ignored


def test_sampling_and_bpe(tmp_path: Path):
    info = train_tokenizer(
        TokenizerSettings(
            inputs=[str(FIXTURE)],
            output_prefix=str(tmp_path / "bpe"),
            vocab_size=360,
            model_type="bpe",
            sample_sentences=150,
            max_sentence_bytes=300,
        ),
        progress=False,
    )
    assert info["corpus"]["sentences"] > 800  # long lines were cut into <= 300-byte pieces
    assert info["corpus"]["sentences_used"] == 150
    tok = Tokenizer(tmp_path / "bpe.model")
    assert tok.vocab_size == 360 and tok.decode(tok.encode("Congress")) == "Congress"


def test_cut_line_respects_bytes_and_characters():
    line = "word " * 30 + "é" * 40
    pieces = list(cut_line(line, 32))
    assert "".join(pieces) == line
    assert all(len(p.encode("utf-8")) <= 32 for p in pieces)


def test_existing_model_is_kept_unless_overwrite(tmp_path: Path, model: Path):
    prefix = tmp_path / "tok"
    (tmp_path / "tok.model").write_bytes(model.read_bytes())
    settings = TokenizerSettings(inputs=[str(FIXTURE)], output_prefix=str(prefix), vocab_size=360)
    with pytest.raises(DataError, match="exists; pass --overwrite"):
        train_tokenizer(settings, progress=False)
    assert (tmp_path / "tok.model").read_bytes() == model.read_bytes()
    settings.overwrite = True
    assert train_tokenizer(settings, progress=False)["vocab_size"] == 360


def test_bad_corpora_are_clear_errors(tmp_path: Path):
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match="no text in the inputs"):
        train_tokenizer(
            TokenizerSettings([str(tmp_path)], str(tmp_path / "a"), vocab_size=360), progress=False
        )
    (tmp_path / "small.txt").write_text("tiny corpus", encoding="utf-8")
    with pytest.raises(DataError, match="Vocabulary size too high"):
        train_tokenizer(
            TokenizerSettings([str(tmp_path)], str(tmp_path / "b"), vocab_size=5000), progress=False
        )
    (tmp_path / "bad.jsonl").write_text("{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: not valid JSON"):
        train_tokenizer(
            TokenizerSettings([str(tmp_path)], str(tmp_path / "c"), vocab_size=360), progress=False
        )
    assert not list(tmp_path.glob("*.model"))


def test_missing_or_corrupt_model_file(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer(tmp_path / "none.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match=r"bad\.model is not a sentencepiece model"):
        Tokenizer(tmp_path / "bad.model")


def test_cli(tmp_path: Path):
    done = run_tool("train_tokenizer.py", "--help")
    assert (
        done.returncode == 0
        and "--vocab-size" in done.stdout
        and "--sample-sentences" in done.stdout
    )
    done = run_tool(
        "train_tokenizer.py",
        str(FIXTURE),
        "--output-prefix",
        str(tmp_path / "t"),
        "--vocab-size",
        "360",
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 't.model'}" in done.stdout and (tmp_path / "t.json").is_file()
    done = run_tool(
        "train_tokenizer.py", str(tmp_path / "missing"), "--output-prefix", str(tmp_path / "u")
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: input '{tmp_path / 'missing'}' does not exist; "
        "pass text files, directories or glob patterns"
    ]


def test_misencoded_input_is_refused_unless_allowed_and_counted_per_file(tmp_path: Path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in sorted(FIXTURE.glob("*.txt"))[:3]:
        (inputs / path.name).write_bytes(path.read_bytes())
    (inputs / "latin1.txt").write_bytes("Grüße aus Köln, ça va?\n".encode("latin-1"))
    common = ["--output-prefix", str(tmp_path / "t"), "--vocab-size", "360", "--quiet"]
    done = run_tool("train_tokenizer.py", str(inputs), *common)
    assert done.returncode == 2 and not (tmp_path / "t.model").exists()
    [line] = done.stderr.splitlines()
    assert "latin1.txt: 4 of 23 characters are invalid sequences" in line
    done = run_tool("train_tokenizer.py", str(inputs), "--allow-invalid-text", *common)
    assert done.returncode == 0, done.stderr
    assert f"{inputs / 'latin1.txt'}: replaced 4 invalid UTF-8 sequences" in done.stdout
    info = json.loads((tmp_path / "t.json").read_text())
    replaced = {Path(s["path"]).name: s["replaced_characters"] for s in info["inputs"]}
    assert replaced.pop("latin1.txt") == 4 and set(replaced.values()) == {0}
