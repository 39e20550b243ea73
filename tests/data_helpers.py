"""Shared builders for the data tests: a tiny tokenizer and shard sets, each built once per session.

pytest fixtures imported into several modules would be built once per module; these helpers
cache their outputs under the session's base temp directory instead.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vqmoe_megatron.data.sharding import ShardSettings, build_shards
from vqmoe_megatron.data.tokenizer_training import TokenizerSettings, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "sotu"


def fixture_documents() -> dict[str, str]:
    """File name -> text of every fixture address."""
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(FIXTURE.glob("*.txt"))}


def tiny_tokenizer(factory: pytest.TempPathFactory) -> Path:
    """A 400-piece unigram model of the fixture (byte fallback, identity normalization)."""
    prefix = factory.getbasetemp() / "data_tokenizer" / "tok"
    model = Path(str(prefix) + ".model")
    if not model.exists():
        train_tokenizer(
            TokenizerSettings(inputs=[str(FIXTURE)], output_prefix=str(prefix), vocab_size=400),
            progress=False,
        )
    return model


def tiny_shards(factory: pytest.TempPathFactory, name: str, **settings) -> Path:
    """Shards of the fixture (seq_length 64 unless given), built once per ``name``."""
    output = factory.getbasetemp() / "data_shards" / name
    if not (output / "manifest.json").exists():
        build_shards(
            shard_settings(factory, output, **settings), progress=False, log=lambda _: None
        )
    return output


def shard_settings(factory: pytest.TempPathFactory, output: Path, **settings) -> ShardSettings:
    """ShardSettings for the fixture with the tiny tokenizer; keywords override."""
    values = {
        "inputs": [str(FIXTURE)],
        "tokenizer": str(tiny_tokenizer(factory)),
        "output": str(output),
        "seq_length": 64,
        "valid_fraction": 0.2,
        "shard_size_mb": 0.1,
        "workers": 2,
        **settings,
    }
    return ShardSettings(**values)


def run_tool(script: str, *args: str, cwd: Path = REPO, env: dict | None = None):
    """Run ``python data_tools/<script> args`` as a user would; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(REPO / "data_tools" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
