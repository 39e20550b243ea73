"""shard.py split into parts and merged (what slurm/shard_corpus.sh runs): the partition of the
input files, byte-identical output to the single-machine run, verified and damaged parts, and
the command-line checks. tests/test_slurm_shard.py runs it as a real slurm array job."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from data_helpers import run_tool, shard_settings, tiny_shards

from vqmoe_megatron.data import DataError
from vqmoe_megatron.data.shard_parts import (
    PARTS_DIR,
    check_mode,
    merge_parts,
    part_dir,
    part_files,
    write_part,
)


@pytest.mark.parametrize("parts", [1, 3, 7, 40])
def test_parts_cover_the_files_in_order_balanced_by_size(parts: int):
    sizes = [5, 100, 3, 0, 40, 40, 1, 90, 7, 60, 2, 2, 30, 0]  # empty files in and at the end
    ranges = [part_files(sizes, k, parts) for k in range(parts)]
    assert [i for r in ranges for i in r] == list(range(len(sizes)))
    total = sum(sizes)
    for k, r in enumerate(ranges):
        first_bytes = [sum(sizes[:i]) for i in r]
        assert all(k * total <= b * parts < (k + 1) * total or b == total for b in first_bytes)
    assert part_files([], 0, 2) == range(0, 0)


def _quiet(_: str) -> None:
    pass


@pytest.mark.parametrize("parts", [4, 25])  # 25 > 18 input files: some parts are empty
def test_merged_parts_equal_the_single_machine_shards(
    parts: int, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
):
    single = tiny_shards(tmp_path_factory, "main")
    settings = shard_settings(tmp_path_factory, tmp_path / "out", workers=1)
    for k in reversed(range(parts)):  # any order: parts are independent
        write_part(settings, k, parts, progress=False, log=_quiet)
    merged = merge_parts(settings, parts, progress=False, log=_quiet)
    out = Path(settings.output)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single.iterdir())
    for shard in single.glob("*.tar"):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name
    reference = json.loads((single / "manifest.json").read_text())
    assert {k for k in merged if merged[k] != reference[k]} == {"created", "settings"}
    logs = []
    assert merge_parts(settings, parts, progress=False, log=logs.append) == merged
    assert "is up to date" in logs[0]


def test_finished_parts_are_verified_and_damaged_ones_redone(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
):
    settings = shard_settings(tmp_path_factory, tmp_path / "out", workers=1)
    first = [write_part(settings, k, 3, progress=False, log=_quiet) for k in range(3)]
    logs: list[str] = []
    assert write_part(settings, 1, 3, progress=False, log=logs.append) == first[1]
    assert logs == ["part 1 of 3 is finished (verified); nothing to do"]

    ids = part_dir(Path(settings.output), 1, 3) / "train.ids"
    data = bytearray(ids.read_bytes())
    data[100] ^= 1
    ids.write_bytes(data)
    with pytest.raises(DataError, match=r"part-00001-of-00003/train\.ids differs from its part"):
        merge_parts(settings, 3, progress=False, log=_quiet)
    assert not (Path(settings.output) / "manifest.json").exists()
    logs.clear()
    assert write_part(settings, 1, 3, progress=False, log=logs.append) == first[1]
    assert logs[0].startswith("part 1 of 3: input files")

    other = dataclasses.replace(settings, seq_length=32, overwrite=True)  # another identity
    with pytest.raises(DataError, match=r"parts 0,1,2 of 3 under .* of other inputs or settings"):
        merge_parts(other, 3, progress=False, log=_quiet)
    merge_parts(settings, 3, progress=False, log=_quiet)
    assert not (Path(settings.output) / PARTS_DIR).exists()


def test_part_options_are_checked(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory):
    for mode, message in (
        ({"part": 0, "parts": None, "merge": False}, "--part and --merge need --parts N"),
        ({"part": None, "parts": None, "merge": True}, "--part and --merge need --parts N"),
        ({"part": 0, "parts": 2, "merge": True}, "not both"),
        ({"part": None, "parts": 2, "merge": False}, "--parts needs --part I or --merge"),
        ({"part": 2, "parts": 2, "merge": False}, "need 0 <= --part < --parts"),
        ({"part": None, "parts": 0, "merge": True}, "--parts >= 1"),
    ):
        with pytest.raises(DataError, match=message):
            check_mode(**mode)
    check_mode(None, None, False)
    s = shard_settings(tmp_path_factory, tmp_path / "out")
    proc = run_tool(
        "shard.py",
        *s.inputs,
        "--tokenizer",
        s.tokenizer,
        "--output",
        s.output,
        "--seq-length",
        "64",
        "--part",
        "0",
    )
    assert proc.returncode == 2 and proc.stderr == (
        "error: --part and --merge need --parts N (the number of parts of the run)\n"
    )
