"""lm-evaluation-harness runs the HF export with the project's ``vqmoe_text`` task and reports
the bits per byte that ``vqmoe-evaluate --text`` reports for the same file."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from convert_helpers import REPO, cli, convert, run_of
from data_helpers import FIXTURE

pytestmark = pytest.mark.slow

TASKS = REPO / "vqmoe_megatron" / "eval_tasks"


def _require_lm_eval() -> None:
    if shutil.which("lm_eval", path=os.path.dirname(sys.executable)) is not None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but lm_eval is missing (pip install -e '.[eval]')")
    pytest.skip("lm-eval is not installed (pip install -e '.[eval]')")


def test_lm_eval_local_task_equals_project_evaluation(tmp_path_factory, tmp_path):
    _require_lm_eval()
    run = run_of(tmp_path_factory, "ep2_zero2")
    text = FIXTURE / "1790_george_washington_n.txt"
    export = tmp_path / "hf"
    convert("hf", run, export)
    out = tmp_path / "ours.json"
    cli("vqmoe_megatron.evaluate", "--checkpoint", run, "--text", text, "--json", out)
    ours = json.loads(out.read_text())["bpb"]
    proc = cli(
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={export},trust_remote_code=True,dtype=float32",
        "--tasks",
        "vqmoe_text",
        "--include_path",
        TASKS,
        "--metadata",
        json.dumps({"text_files": [str(text)]}),
        "--device",
        "cpu",
        "--batch_size",
        "8",
        "--output_path",
        tmp_path / "lm_eval",
    )
    (results,) = Path(tmp_path / "lm_eval").rglob("results_*.json")
    theirs = json.loads(results.read_text())["results"]["vqmoe_text"]["bits_per_byte,none"]
    assert theirs == pytest.approx(ours, rel=1e-4), proc.stdout[-2000:]
