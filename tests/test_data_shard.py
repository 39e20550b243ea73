"""shard.py end to end: counts, round trip, plain-tar readability, re-runs, resume and bad input."""

import dataclasses
import gzip
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from data_helpers import (
    FIXTURE,
    fixture_documents,
    run_tool,
    shard_settings,
    tiny_shards,
    tiny_tokenizer,
)

from vqmoe_megatron.data import DataError, Tokenizer, TokenShardLoader, load_manifest
from vqmoe_megatron.data.shard_format import (
    _canonical_samples,
    iter_shard,
    read_shard,
    shard_tar,
    token_dtype,
)
from vqmoe_megatron.data.shard_workspace import ShardWorkspace
from vqmoe_megatron.data.sharding import build_shards
from vqmoe_megatron.data.store import open_store


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_shards(tmp_path_factory, "main")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(tiny_tokenizer(tmp_path_factory))


def _split_documents(data: Path, split: str, tokenizer: Tokenizer) -> list[str]:
    """Read a split through the loader (in order) and cut its stream back into documents."""
    loader = TokenShardLoader(
        data,
        split,
        micro_batch_size=7,
        dp_rank=0,
        dp_size=1,
        num_workers=0,
        seed=0,
        shuffle=False,
        infinite=False,
    )
    batches = list(loader)
    index = np.concatenate([b["index"].numpy() for b in batches])
    samples = np.concatenate([b["tokens"].numpy() for b in batches])
    assert (index == np.arange(len(index))).all()
    stream = np.concatenate([samples[0]] + [s[1:] for s in samples[1:]])
    stream = stream[stream != tokenizer.pad_id]
    assert stream[0] == tokenizer.eos_id and stream[-1] == tokenizer.eos_id
    ends = np.flatnonzero(stream == tokenizer.eos_id)
    return [tokenizer.decode(stream[a + 1 : b]) for a, b in zip(ends[:-1], ends[1:])]


def test_round_trip_and_counts_match_sentencepiece(data: Path, tokenizer: Tokenizer):
    manifest = load_manifest(data)
    originals = list(fixture_documents().values())
    decoded = {split: _split_documents(data, split, tokenizer) for split in ("train", "valid")}
    assert decoded["train"] and decoded["valid"]
    assert sorted(decoded["train"] + decoded["valid"]) == sorted(originals)
    for split, docs in decoded.items():
        assert docs == [d for d in originals if d in docs]  # document order is file order
        info = manifest.split(split)
        assert info.documents == len(docs)
        assert info.tokens == sum(len(tokenizer.encode(d)) + 1 for d in docs)
        assert info.bytes == sum(len(d.encode("utf-8")) for d in docs)
        assert info.samples == -(-info.tokens // manifest.seq_length)
    assert (
        manifest.tokenizer_sha256 == tokenizer.sha256
        and manifest.vocab_size == tokenizer.vocab_size
    )
    assert manifest.dtype == "uint16" and manifest.seq_length == 64
    assert len(manifest.split("train").shards) > 5
    names = sorted(p.name for p in data.iterdir())
    assert names == sorted(
        ["manifest.json"] + [s.name for sp in manifest.splits.values() for s in sp.shards]
    )
    assert names[1] == "train-000000.tar"


def test_shards_are_plain_webdataset_tars(data: Path):
    manifest = load_manifest(data)
    shard = manifest.split("train").shards[1]
    listing = subprocess.run(
        ["tar", "tf", str(data / shard.name)], capture_output=True, text=True, check=True
    )
    first = manifest.samples_per_shard
    assert listing.stdout.split() == [
        f"{i:010d}.tokens.npy" for i in range(first, first + shard.samples)
    ]
    samples = list(wds.WebDataset(str(data / shard.name), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [
        f"{i:010d}" for i in range(first, first + shard.samples)
    ]
    ours = iter_shard(
        manifest.store,
        shard.name,
        first_index=first,
        samples=shard.samples,
        sample_length=65,
        dtype="uint16",
        vocab_size=manifest.vocab_size,
        sha256=shard.sha256,
    )
    for sample, (_, array) in zip(samples, ours, strict=True):
        assert sample["tokens.npy"].dtype == np.uint16 and (sample["tokens.npy"] == array).all()


def test_read_shard_decodes_whole_shards_and_falls_back_to_member_reading(tmp_path: Path):
    """read_shard decodes a shard_tar shard as one array; a tar that differs from that layout
    (here: another mtime, as other tar writers set) is read member by member, with the same
    result; ids >= the vocabulary are refused on both paths."""
    samples = np.random.default_rng(0).integers(0, 50, size=(7, 9)).astype(np.uint16)
    (tmp_path / "ours.tar").write_bytes(shard_tar(samples, 20))
    with tarfile.open(tmp_path / "other.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for k, row in enumerate(samples):
            buf = io.BytesIO()
            np.save(buf, row)
            info = tarfile.TarInfo(f"{20 + k:010d}.tokens.npy")
            info.size, info.mtime = len(buf.getvalue()), 1234
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    store, rows = open_store(tmp_path), np.array([5, 0, 3, 6])
    settings = {"first_index": 20, "samples": 7, "sample_length": 9, "dtype": "uint16"}
    for name, canonical in [("ours.tar", True), ("other.tar", False)]:
        data = np.frombuffer((tmp_path / name).read_bytes(), np.uint8)
        assert (_canonical_samples(data, **settings) is not None) == canonical
        read = read_shard(store, name, vocab_size=50, rows=rows, **settings)
        assert read.dtype == np.uint16 and (read == samples[rows]).all()
        with pytest.raises(DataError, match=rf"{name} .*0000000023.tokens.npy holds ids >= vocab"):
            read_shard(store, name, vocab_size=int(samples[3].max()), rows=rows, **settings)


def test_uint32_when_the_vocabulary_needs_it(tmp_path: Path):
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
    samples = np.array([[0, 70000, 5], [5, 99999, 1]], dtype=np.uint32)
    (tmp_path / "s.tar").write_bytes(shard_tar(samples, 10))
    read = list(
        iter_shard(
            open_store(tmp_path),
            "s.tar",
            first_index=10,
            samples=2,
            sample_length=3,
            dtype="uint32",
            vocab_size=100000,
        )
    )
    assert [i for i, _ in read] == [10, 11] and (np.stack([a for _, a in read]) == samples).all()


def test_shard_tar_equals_what_tarfile_writes():
    samples = np.random.default_rng(0).integers(0, 400, size=(9, 65)).astype(np.uint16)
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, row in enumerate(samples):
            payload = io.BytesIO()
            np.save(payload, row)
            info = tarfile.TarInfo(f"{40 + i:010d}.tokens.npy")
            info.size, info.mode, info.mtime = payload.tell(), 0o644, 0
            payload.seek(0)
            tar.addfile(info, payload)
    assert bytes(shard_tar(samples, 40)) == reference.getvalue()


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.tar")}


def test_rerun_skips_valid_shards_and_rebuilds_damaged_ones(
    data: Path, tmp_path: Path, tmp_path_factory
):
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    settings = shard_settings(tmp_path_factory, copy)
    logs: list[str] = []
    before = _mtimes(copy)
    build_shards(settings, progress=False, log=logs.append)
    assert "up to date" in logs[-1] and _mtimes(copy) == before
    damaged = copy / "train-000002.tar"
    damaged.write_bytes(damaged.read_bytes()[:3000])
    build_shards(settings, progress=False, log=logs.append)
    after = _mtimes(copy)
    assert (copy / "train-000002.tar").read_bytes() == (data / "train-000002.tar").read_bytes()
    assert {n for n in after if after[n] != before[n]} == {"train-000002.tar"}
    assert not (copy / ".incoming").exists()


def _interrupted(settings, monkeypatch, after: int) -> None:
    """Run build_shards and stop it (as Ctrl-C would) right after it staged ``after`` shards."""
    store = ShardWorkspace.store_shard
    stored: list[str] = []

    def store_then_stop(self, record, payload):
        store(self, record, payload)
        stored.append(record.name)
        if len(stored) == after:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardWorkspace, "store_shard", store_then_stop)
    with pytest.raises(KeyboardInterrupt):
        build_shards(settings, progress=False, log=lambda _: None)
    monkeypatch.undo()
    assert not Path(settings.output, "manifest.json").exists()
    assert len(list(Path(settings.output, ".incoming").glob("*.tar"))) == after


def _assert_same_shards(manifest: dict, output: Path, reference: Path) -> None:
    expected = json.loads((reference / "manifest.json").read_text())
    assert manifest["fingerprint"] == expected["fingerprint"]
    assert manifest["splits"] == expected["splits"]
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            assert (output / shard["name"]).read_bytes() == (reference / shard["name"]).read_bytes()


def test_interrupted_run_resumes_where_it_stopped(
    data: Path, tmp_path: Path, tmp_path_factory, monkeypatch
):
    settings = shard_settings(tmp_path_factory, tmp_path / "out")
    _interrupted(settings, monkeypatch, after=9)
    logs: list[str] = []
    manifest = build_shards(settings, progress=False, log=logs.append)
    restart = int(logs[0].rsplit(" ", 1)[1])
    assert logs[0].startswith("resuming: 9 shards done") and restart > 0  # skipped some input
    _assert_same_shards(manifest, tmp_path / "out", data)


def test_line_documents_in_a_compressed_file_resume_mid_file(
    tmp_path: Path, tmp_path_factory, monkeypatch
):
    lines = [
        line for doc in fixture_documents().values() for line in doc.splitlines() if line.strip()
    ]
    text = "\n".join(f"{i}: {line}" for i, line in enumerate(lines * 5)) + "\n"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "lines.txt.gz").write_bytes(gzip.compress(text.encode("utf-8")))
    make = lambda out: shard_settings(  # noqa: E731
        tmp_path_factory,
        tmp_path / out,
        inputs=[str(tmp_path / "in")],
        text_documents="line",
        valid_fraction=0.0,
    )
    reference = build_shards(make("reference"), progress=False, log=lambda _: None)
    tokenizer = Tokenizer(tiny_tokenizer(tmp_path_factory))
    docs = text.splitlines()
    assert sum(s["documents"] for s in reference["splits"].values()) == len(docs)
    assert sum(s["tokens"] for s in reference["splits"].values()) == sum(
        len(tokenizer.encode(d)) + 1 for d in docs
    )
    assert len(reference["splits"]["train"]["shards"]) > 110  # the file is 2 chunks of input
    _interrupted(make("out"), monkeypatch, after=100)
    logs: list[str] = []
    manifest = build_shards(make("out"), progress=False, log=logs.append)
    assert logs[0].startswith("resuming: 100 shards done, re-reading from input chunk 1")
    _assert_same_shards(manifest, tmp_path / "out", tmp_path / "reference")


def test_other_corpus_is_refused_unless_overwrite(data: Path, tmp_path: Path, tmp_path_factory):
    out = tmp_path / "out"
    shutil.copytree(data, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = shard_settings(tmp_path_factory, out, seq_length=32)
    with pytest.raises(
        DataError, match=r"holds shards of another corpus.*seq_length 64 -> 32.*--overwrite"
    ):
        build_shards(other, progress=False, log=lambda _: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # With --overwrite, a bad input found mid-way still leaves the earlier output intact ...
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURE, bad)
    (bad / "zz.jsonl").write_text('{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    broken = dataclasses.replace(other, inputs=[str(bad)], overwrite=True)
    with pytest.raises(DataError, match=r"zz\.jsonl:2: not valid JSON"):
        build_shards(broken, progress=False, log=lambda _: None)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".incoming"} == before
    # ... and once the new set is complete it replaces the old one, stale shards included.
    manifest = build_shards(
        dataclasses.replace(other, overwrite=True), progress=False, log=lambda _: None
    )
    names = {s["name"] for split in manifest["splits"].values() for s in split["shards"]}
    assert {p.name for p in out.iterdir()} == names | {"manifest.json"}
    assert load_manifest(out).seq_length == 32


def test_stray_shards_without_manifest_are_refused(tmp_path: Path, tmp_path_factory):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"someone else's")
    with pytest.raises(DataError, match="shard files without a manifest.json"):
        build_shards(shard_settings(tmp_path_factory, out), progress=False, log=lambda _: None)
    assert (out / "train-000000.tar").read_bytes() == b"someone else's"


def test_invalid_utf8_and_empty_documents_are_reported(tmp_path: Path, tmp_path_factory):
    inputs = tmp_path / "in"
    inputs.mkdir()
    text = (FIXTURE / "1790_george_washington_n.txt").read_bytes()
    (inputs / "a.txt").write_bytes(text[:2000] + b"\xff\xfe" + text[2000:])
    (inputs / "b.txt").write_text(" \n", encoding="utf-8")
    (inputs / "c.jsonl.gz").write_bytes(
        gzip.compress(b'{"text": ""}\n{"text": "a short review"}\n')
    )
    out = tmp_path / "out"
    done = run_tool(
        "shard.py", str(inputs), "--tokenizer", str(tiny_tokenizer(tmp_path_factory)), "--output", str(out),
        "--seq-length", "64", "--valid-fraction", "0", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (
        "replaced 2 invalid UTF-8 sequences" in done.stdout
        and "skipped 2 empty documents" in done.stdout
    )
    manifest = json.loads((out / "manifest.json").read_text())
    by_name = {Path(s["path"]).name: s for s in manifest["sources"]}
    assert by_name["a.txt"]["replaced_characters"] == 2 and by_name["b.txt"]["empty_documents"] == 1
    assert by_name["c.jsonl.gz"]["documents"] == 1 and manifest["splits"]["train"]["documents"] == 2
    assert manifest["splits"]["valid"]["samples"] == 0


def test_empty_corpus_and_unknown_type_are_one_line_cli_errors(tmp_path: Path, tmp_path_factory):
    common = ["--tokenizer", str(tiny_tokenizer(tmp_path_factory)), "--output", str(tmp_path / "o")]
    common += ["--seq-length", "8", "--quiet"]
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    done = run_tool("shard.py", str(tmp_path / "empty.txt"), *common)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: no documents in the inputs (1 file(s), 1 empty document(s) skipped); pass files "
        "that contain text"
    ]
    (tmp_path / "table.csv").write_text("a,b", encoding="utf-8")
    done = run_tool("shard.py", str(tmp_path), *common)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert "table.csv: unsupported file type" in done.stderr
    help_text = run_tool("shard.py", "--help").stdout
    assert all(flag in help_text for flag in ("--seq-length", "--shard-size-mb", "--overwrite"))


def test_utf16_is_decoded_and_binary_input_refused_unless_allowed(tmp_path: Path, tmp_path_factory):
    text = (FIXTURE / "1790_george_washington_n.txt").read_text(encoding="utf-8")
    for name, data in [("utf8", text.encode("utf-8")), ("utf16", text.encode("utf-16"))]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.txt").write_bytes(data)
    common = ["--tokenizer", str(tiny_tokenizer(tmp_path_factory)), "--seq-length", "64"]
    common += ["--valid-fraction", "0", "--quiet"]
    for name in ("utf8", "utf16"):
        out = tmp_path / f"out-{name}"
        done = run_tool("shard.py", str(tmp_path / name), "--output", str(out), *common)
        assert done.returncode == 0 and "replaced" not in done.stdout, done.stderr
    shards = [tmp_path / f"out-{name}" / "train-000000.tar" for name in ("utf8", "utf16")]
    assert shards[0].read_bytes() == shards[1].read_bytes()

    (tmp_path / "utf8" / "x.txt").write_bytes(np.random.default_rng(0).bytes(4096))
    out = tmp_path / "mixed"
    done = run_tool("shard.py", str(tmp_path / "utf8"), "--output", str(out), *common)
    assert done.returncode == 2 and done.stdout == "" and not (out / "manifest.json").exists()
    [line] = done.stderr.splitlines()
    assert line.startswith("error: ") and "x.txt: it holds NUL characters" in line
    assert "--allow-invalid-text" in line
    done = run_tool(
        "shard.py", str(tmp_path / "utf8"), "--output", str(out), "--allow-invalid-text", *common
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    replaced = {Path(s["path"]).name: s["replaced_characters"] for s in manifest["sources"]}
    assert replaced["a.txt"] == 0 and replaced["x.txt"] > 1000
    assert f"x.txt: replaced {replaced['x.txt']} invalid UTF-8 sequences" in done.stdout
