"""Shared builders for the data tests: a tiny tokenizer, built once per session.

pytest fixtures imported into several modules would be built once per module; these helpers
cache their outputs under the session's base temp directory instead.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
