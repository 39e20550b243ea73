"""Hostile inputs to the data tools and the pretraining CLI: each ends in exit status 2 and one
``error:`` line (argparse's own usage errors: the usage, then one ``error:`` line), never a
traceback, and leaves every file that existed before as it was.

The commands run in this process through ``runpy`` exactly as ``python <script> ...`` runs them
(an exception that escaped them would fail the test), so the sweep costs no interpreter starts.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import runpy
import signal
import sys
from pathlib import Path

import pytest
from data_helpers import tiny_shards, tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "pretrain" / "configs" / "tiny.yaml"


def _files(root: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The files the cases point at: broken inputs and outputs that already exist."""
    tmp = tmp_path_factory.mktemp("hostile")
    text = "A document of plain text.\n" * 40
    gz = gzip.compress(text.encode())
    files = {
        "file": b"a regular file",
        "empty.txt": b"",
        "random.txt": random.Random(0).randbytes(4096),
        "cut.txt.gz": gz[: len(gz) // 2],
        "doc.txt": text.encode(),
        "table.csv": b"a,b\n",
        "bad.jsonl": b'{"text": "a"}\n{"text": \n',
        "notjson/manifest.json": b'{"format": ',
        "listjson/manifest.json": b"[1, 2]",
        "noshards/manifest.json": b"{}",
        "notzip.whl": b"not a zip archive",
        "bad.yaml": b"model: [",
        "list.yaml": b"- 1\n",
        "binary.yaml": random.Random(1).randbytes(256),
        "bad_ds.json": b"{",
        "taken/notes.txt": b"someone's notes",
        "taken/train-000000.tar": b"someone else's shard",
        "prev.model": b"an earlier tokenizer",
        "empty_dir/.keep": b"",
    }
    for name, data in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    return {
        "tmp": str(tmp),
        "tok": str(tiny_tokenizer(tmp_path_factory)),
        "shards": str(tiny_shards(tmp_path_factory, "main")),
    }


SHARD = [
    "data_tools/shard.py",
    "{tmp}/doc.txt",
    "--tokenizer",
    "{tok}",
    "--output",
    "{out}",
    "--seq-length",
    "16",
]
TOK = [
    "data_tools/train_tokenizer.py",
    "{tmp}/doc.txt",
    "--output-prefix",
    "{tmp}/t",
    "--vocab-size",
    "300",
]
PRE = ["pretrain/pretrain_vqmoe.py", "--config", str(TINY)]
DRY = [*PRE, "--dry-run", "model.vocab_size=400"]  # options may follow overrides
RUN = [*PRE, "data.data_dir={shards}", "train.output_dir={tmp}/run"]

CASES = {
    # fetch_corpus
    "fetch: unknown corpus": (["data_tools/fetch_corpus.py", "nope"], "unknown corpus nope"),
    "fetch: --from missing": (["data_tools/fetch_corpus.py", "sotu", "--from", "{tmp}/none", "--output", "{tmp}/c"], "none"),
    "fetch: --from without the archive": (["data_tools/fetch_corpus.py", "sotu", "--from", "{tmp}/empty_dir", "--output", "{tmp}/c"], "empty_dir"),
    "fetch: --output under a file": (["data_tools/fetch_corpus.py", "sotu", "--from", "{tmp}/empty_dir", "--output", "{tmp}/file/c"], "file is a file"),
    # train_tokenizer
    "tok: missing input": (["data_tools/train_tokenizer.py", "{tmp}/none.txt", "--output-prefix", "{tmp}/t"], "does not exist"),
    "tok: empty input": (["data_tools/train_tokenizer.py", "{tmp}/empty.txt", "--output-prefix", "{tmp}/t"], "no text in the inputs"),
    "tok: random bytes": (["data_tools/train_tokenizer.py", "{tmp}/random.txt", "--output-prefix", "{tmp}/t"], "random.txt: it holds NUL characters"),
    "tok: truncated gzip": (["data_tools/train_tokenizer.py", "{tmp}/cut.txt.gz", "--output-prefix", "{tmp}/t"], "cut.txt.gz: cannot read it"),
    "tok: unsupported type": (["data_tools/train_tokenizer.py", "{tmp}/table.csv", "--output-prefix", "{tmp}/t"], "unsupported file type"),
    "tok: bad JSONL": (["data_tools/train_tokenizer.py", "{tmp}/bad.jsonl", "--output-prefix", "{tmp}/t"], "bad.jsonl:2: not valid JSON"),
    "tok: vocab size 0": ([*TOK[:-1], "0"], "--vocab-size"),
    "tok: vocab size text": ([*TOK[:-1], "many"], "invalid int value"),
    "tok: coverage 2": ([*TOK, "--character-coverage", "2"], "--character-coverage"),
    "tok: threads 0": ([*TOK, "--threads", "0"], "--threads"),
    "tok: existing model": (["data_tools/train_tokenizer.py", "{tmp}/doc.txt", "--output-prefix", "{tmp}/prev"], "prev.model exists"),
    "tok: prefix under a file": (["data_tools/train_tokenizer.py", "{tmp}/doc.txt", "--output-prefix", "{tmp}/file/t"], "file is a file"),
    "tok: max sentence bytes 0": ([*TOK, "--max-sentence-bytes", "0"], "--max-sentence-bytes"),
    # shard
    "shard: missing tokenizer": ([*SHARD[:3], "{tmp}/none.model", *SHARD[4:]], "none.model does not exist"),
    "shard: tokenizer not a model": ([*SHARD[:3], "{tmp}/doc.txt", *SHARD[4:]], "not a sentencepiece model"),
    "shard: seq length 0": ([*SHARD[:-1], "0"], "--seq-length"),
    "shard: seq length text": ([*SHARD[:-1], "long"], "invalid int value"),
    "shard: valid fraction 1.5": ([*SHARD, "--valid-fraction", "1.5"], "--valid-fraction"),
    "shard: shard size -1": ([*SHARD, "--shard-size-mb", "-1"], "--shard-size-mb"),
    "shard: workers 0": ([*SHARD, "--workers", "0"], "--workers"),
    "shard: random bytes": (["data_tools/shard.py", "{tmp}/random.txt", *SHARD[2:]], "random.txt: it holds NUL characters"),
    "shard: empty input": (["data_tools/shard.py", "{tmp}/empty.txt", *SHARD[2:]], "no documents in the inputs"),
    "shard: truncated gzip": (["data_tools/shard.py", "{tmp}/cut.txt.gz", *SHARD[2:]], "cut.txt.gz: cannot read it"),
    "shard: output is a file": ([*SHARD[:5], "{tmp}/file", *SHARD[6:]], "file is a file"),
    "shard: output under a file": ([*SHARD[:5], "{tmp}/file/o", *SHARD[6:]], "file is a file"),
    "shard: output holds other shards": ([*SHARD[:5], "{tmp}/taken", *SHARD[6:]], "shard files without a manifest.json"),
    # inspect
    "inspect: missing dir": (["data_tools/inspect.py", "{tmp}/none"], "does not exist"),
    "inspect: not JSON": (["data_tools/inspect.py", "{tmp}/notjson"], "is not valid JSON"),
    "inspect: JSON list": (["data_tools/inspect.py", "{tmp}/listjson"], "manifest.json"),
    "inspect: JSON without fields": (["data_tools/inspect.py", "{tmp}/noshards"], "manifest.json"),
    "inspect: unknown split": (["data_tools/inspect.py", "{shards}", "--split", "nope", "--sample", "0"], "nope"),
    "inspect: tokenizer not a model": (["data_tools/inspect.py", "{shards}", "--sample", "0", "--tokenizer", "{tmp}/doc.txt"], "not a sentencepiece model"),
    "inspect: sample out of range": (["data_tools/inspect.py", "{shards}", "--sample", "99999999"], "99999999 is out of range"),
    # make_sst2
    "sst2: missing source": (["data_tools/make_sst2.py", "{tmp}/none.whl", "--out", "{tmp}/sst2"], "none.whl"),
    "sst2: not a zip": (["data_tools/make_sst2.py", "{tmp}/notzip.whl", "--out", "{tmp}/sst2"], "notzip.whl"),
    "sst2: --out under a file": (["data_tools/make_sst2.py", "{tmp}/notzip.whl", "--out", "{tmp}/file/sst2"], "file is a file"),
    "sst2: dev fraction 2": (["data_tools/make_sst2.py", "{tmp}/notzip.whl", "--out", "{tmp}/sst2", "--dev-fraction", "2"], "fraction"),
    # pretraining
    "pretrain: missing config": (["pretrain/pretrain_vqmoe.py", "--config", "{tmp}/none.yaml"], "none.yaml does not exist"),
    "pretrain: malformed YAML": (["pretrain/pretrain_vqmoe.py", "--config", "{tmp}/bad.yaml"], "is not valid YAML"),
    "pretrain: YAML list": (["pretrain/pretrain_vqmoe.py", "--config", "{tmp}/list.yaml"], "must hold a mapping"),
    "pretrain: binary config": (["pretrain/pretrain_vqmoe.py", "--config", "{tmp}/binary.yaml"], "binary.yaml"),
    "pretrain: unknown key": ([*DRY, "train.lrr=1"], "did you mean 'lr'"),
    "pretrain: wrong type": ([*DRY, "train.steps=many"], "expected an integer"),
    "pretrain: negative lr": ([*DRY, "train.lr=-1"], "train.lr=-1.0 is out of range"),
    "pretrain: experts vs EP": ([*DRY, "--world-size", "2", "moe.num_experts=3", "parallel.expert_parallel=2"], "moe.num_experts=3 is not divisible"),
    "pretrain: world size 0": ([*DRY, "--world-size", "0"], "--world-size"),
    "pretrain: world size text": ([*DRY, "--world-size", "two"], "invalid int value"),
    "pretrain: missing data dir": ([*PRE, "data.data_dir={tmp}/none", "train.output_dir={tmp}/run"], "manifest.json does not exist"),
    "pretrain: manifest not JSON": ([*PRE, "data.data_dir={tmp}/notjson", "train.output_dir={tmp}/run"], "is not valid JSON"),
    "pretrain: seq length vs data": ([*RUN, "model.seq_length=128"], "seq_length"),
    "pretrain: output dir is a file": ([*PRE, "data.data_dir={shards}", "train.output_dir={tmp}/file"], "file is a file, not a directory"),
    "pretrain: output dir under a file": ([*PRE, "data.data_dir={shards}", "train.output_dir={tmp}/file/run"], "file is a file, not a directory"),
    "pretrain: missing DeepSpeed JSON": ([*RUN, "train.deepspeed_config={tmp}/none.json"], "none.json does not exist"),
    "pretrain: malformed DeepSpeed JSON": ([*RUN, "train.deepspeed_config={tmp}/bad_ds.json"], "is not valid JSON"),
}  # fmt: skip


@pytest.fixture
def sigint_restored():
    """The commands install their own Ctrl-C handling (``interrupt``); give pytest its own back."""
    before = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_one_error_line(
    case: str, world: dict[str, str], capsys, monkeypatch, sigint_restored
):
    args, fragment = CASES[case]
    out = Path(world["tmp"]) / "outputs" / case.replace(" ", "_").replace(":", "")
    args = [a.format(**world, out=out) for a in args]
    script = REPO / args[0]
    before = _files(Path(world["tmp"]))
    monkeypatch.setattr(sys, "argv", [str(script), *args[1:]])
    monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])  # as `python script` does
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(script), run_name="__main__")
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    if not lines[-1].startswith("error: "):  # argparse: usage, then "<prog>: error: ..."
        assert lines[0].startswith("usage:"), err
    assert fragment in errors[0], err
    after = _files(Path(world["tmp"]))
    assert {p: after.get(p) for p in before} == before, "an existing file was changed"
