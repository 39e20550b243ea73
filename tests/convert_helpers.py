"""Shared by the conversion and evaluation tests: tiny trained runs (once per session), the
real command lines, and the project model's logits computed in the test process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
from data_helpers import FIXTURE, tiny_shards
from dist_utils import child_env, torchrun_command
from moe_helpers import init_single_process
from pretrain_helpers import REPO, trained_run

from vqmoe_megatron.convert.source import load_model, open_source, with_layout
from vqmoe_megatron.convert.verify import project_logits
from vqmoe_megatron.data.tokenizer_training import TokenizerSettings, train_tokenizer

RUNS = {
    "ep1_zero1": (1, ("train.zero_stage=1",)),
    "ep2_zero2": (2, ("parallel.expert_parallel=2", "train.zero_stage=2")),
}
"""Tiny runs saved at both expert-parallel sizes and both ZeRO stages: name -> (ranks, overrides)."""


def shards(factory: pytest.TempPathFactory) -> Path:
    """The pretraining tests' shards (shared cache)."""
    return tiny_shards(factory, "pretrain", shard_size_mb=0.05)


def run_of(factory: pytest.TempPathFactory, name: str) -> Path:
    """The finished tiny run ``name`` of :data:`RUNS` (3 steps)."""
    nproc, extra = RUNS[name]
    return trained_run(factory, name, shards(factory), *extra, nproc=nproc)


def cli(module: str, *args: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` (under torchrun for ``nproc`` > 1), offline."""
    launcher = torchrun_command(nproc) if nproc > 1 else [sys.executable]
    proc = subprocess.run(
        [*launcher, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env=child_env({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}),
        cwd=REPO,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"{module} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-5000:]}")
    return proc


def convert(*args: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m vqmoe_megatron.convert args``."""
    return cli("vqmoe_megatron.convert", *args, nproc=nproc, check=check)


def conversion_record(out: Path) -> dict:
    """The ``conversion.json`` a conversion wrote."""
    return json.loads((out / "conversion.json").read_text())


def project_logits_of(
    path: Path, tokens: torch.Tensor, routing: Optional[str] = None
) -> torch.Tensor:
    """Logits [B, S, V] of the project model loaded from ``path`` in this process (TP = EP = 1)."""
    init_single_process()
    source = open_source(path)
    return project_logits(load_model(source, with_layout(source.cfg, 1, 1, routing)), tokens)


def random_tokens(vocab_size: int, batch: int = 3, length: int = 64, seed: int = 5) -> torch.Tensor:
    """Seeded random token ids [batch, length]."""
    return torch.randint(vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, exactly one ``error:`` line naming every fragment, no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def other_tokenizer(directory: Path, vocab_size: int = 384) -> Path:
    """A tokenizer of the fixture with another vocabulary size than the tiny runs' (400)."""
    prefix = directory / f"tok{vocab_size}"
    train_tokenizer(
        TokenizerSettings(inputs=[str(FIXTURE)], output_prefix=str(prefix), vocab_size=vocab_size),
        progress=False,
    )
    return Path(f"{prefix}.model")


LM_EVAL_TASKS = REPO / "vqmoe_megatron" / "eval_tasks"


def require_lm_eval() -> None:
    """Skip without lm-eval, except in CI (where its absence is a broken install)."""
    if shutil.which("lm_eval", path=os.path.dirname(sys.executable)) is not None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but lm_eval is missing (pip install -e '.[eval]')")
    pytest.skip("lm-eval is not installed (pip install -e '.[eval]')")


def lm_eval_bits_per_byte(export: Path, text: Path, output: Path) -> float:
    """lm-evaluation-harness's bits per byte of ``text`` (the project's ``vqmoe_text`` task) on
    the HF export ``export``, run as a user would."""
    require_lm_eval()
    proc = cli(
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={export},trust_remote_code=True,dtype=float32",
        "--tasks",
        "vqmoe_text",
        "--include_path",
        LM_EVAL_TASKS,
        "--metadata",
        json.dumps({"text_files": [str(text)]}),
        "--device",
        "cpu",
        "--batch_size",
        "8",
        "--output_path",
        output,
    )
    found = list(Path(output).rglob("results_*.json"))
    assert len(found) == 1, proc.stdout[-2000:]
    return json.loads(found[0].read_text())["results"]["vqmoe_text"]["bits_per_byte,none"]
