"""data_tools/inspect.py: runs as a script (its name shadows the stdlib module), summarises, decodes."""

import json
from pathlib import Path

import pytest
from data_helpers import REPO, fixture_documents, run_tool, tiny_shards


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_shards(tmp_path_factory, "main")


@pytest.mark.parametrize("where", ["elsewhere", "data_tools"])
def test_summary_verification_and_decoding(data: Path, tmp_path: Path, where: str):
    cwd = REPO / "data_tools" if where == "data_tools" else tmp_path
    script = "inspect.py" if where == "data_tools" else str(REPO / "data_tools" / "inspect.py")
    done = run_tool(script, str(data), "--sample", "0", "--sample", "3", "--verify", cwd=cwd)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((data / "manifest.json").read_text())
    shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    for name, split in manifest["splits"].items():
        row = next(line for line in done.stdout.splitlines() if line.startswith(name + " "))
        assert f"{split['tokens']:,}" in row and f"{split['samples']:,}" in row
    assert f"verified {shards} shards" in done.stdout
    first = done.stdout.split("--- train sample 0: 65 ids, 0 pad ---\n")[1].split("\n---")[0]
    assert first.startswith("[EOS]") and len(first) > 40
    assert any(
        doc.startswith(first[len("[EOS]") :].rstrip("\n")) for doc in fixture_documents().values()
    )
    assert "--- train sample 3: 65 ids" in done.stdout


def test_errors_are_one_line(data: Path, tmp_path: Path):
    done = run_tool("inspect.py", str(data), "--sample", "99999999")
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"error: --sample 99999999 is out of range: split 'train' has "
        f"{json.loads((data / 'manifest.json').read_text())['splits']['train']['samples']} samples"
    ]
    done = run_tool("inspect.py", str(tmp_path))
    assert done.returncode == 2 and "manifest.json does not exist" in done.stderr
    assert "Traceback" not in done.stderr
