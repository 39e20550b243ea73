"""Shared pieces of the fine-tuning CLI tests: GLUE-format data folders and running
finetune/glue.py (the tiny pretrained checkpoint is ``convert_helpers.run_of``'s)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from data_helpers import FIXTURE
from pretrain_helpers import REPO, run_program

FINETUNE = REPO / "finetune" / "glue.py"
GLUE_FIXTURES = REPO / "tests" / "fixtures" / "glue"


def glue_copy(destination: Path) -> Path:
    """A writable copy of the fixture GLUE folder (all nine tasks, a few rows each)."""
    return Path(shutil.copytree(GLUE_FIXTURES, destination))


def sentence_task(destination: Path, train: int, dev: int) -> Path:
    """An SST-2-format folder of SOTU fixture sentences labelled by length (more than 20 words:
    1), with ``train`` and ``dev`` rows and a 5-row test file; returns the GLUE folder."""
    text = " ".join(p.read_text(encoding="utf-8") for p in sorted(FIXTURE.glob("*.txt")))
    sentences = [" ".join(s.split()) for s in re.split(r"(?<=[.;!?])\s+", text)]
    sentences = [s for s in sentences if 3 <= len(s.split()) <= 40][: train + dev + 5]
    if len(sentences) < train + dev + 5:
        raise ValueError(f"the fixture has only {len(sentences)} usable sentences")
    folder = destination / "SST-2"
    folder.mkdir(parents=True)

    def labelled(rows: list[str]) -> str:
        lines = [f"{s}\t{int(len(s.split()) > 20)}" for s in rows]
        return "sentence\tlabel\n" + "\n".join(lines) + "\n"

    (folder / "train.tsv").write_text(labelled(sentences[:train]), encoding="utf-8")
    (folder / "dev.tsv").write_text(labelled(sentences[train : train + dev]), encoding="utf-8")
    test = [f"{i}\t{s}" for i, s in enumerate(sentences[train + dev :])]
    (folder / "test.tsv").write_text("index\tsentence\n" + "\n".join(test) + "\n", "utf-8")
    return destination


def finetune_args(task: str, data_dir: Path, pretrained: Path, out: Path, *extra: str) -> list[str]:
    """The CLI arguments of a short, quiet run (log every step, no TensorBoard)."""
    return [
        "--task",
        task,
        "--data_dir",
        str(data_dir),
        "--pretrained",
        str(pretrained),
        "--output_dir",
        str(out),
        "train.log_interval=1",
        *extra,
    ]


def finetune(
    task: str,
    data_dir: Path,
    pretrained: Path,
    out: Path,
    *extra: str,
    nproc: int = 1,
    launcher: str = "python",
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run finetune/glue.py to completion."""
    args = finetune_args(task, data_dir, pretrained, out, *extra)
    return run_program(FINETUNE, args, nproc=nproc, launcher=launcher, check=check)
