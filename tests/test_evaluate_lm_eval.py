"""lm-evaluation-harness runs the HF export with the project's ``vqmoe_text`` task and reports
the bits per byte that ``vqmoe-evaluate --text`` reports for the same file."""

from __future__ import annotations

import json

import pytest
from convert_helpers import cli, convert, lm_eval_bits_per_byte, require_lm_eval, run_of
from data_helpers import FIXTURE

pytestmark = pytest.mark.slow


def test_lm_eval_local_task_equals_project_evaluation(tmp_path_factory, tmp_path):
    require_lm_eval()
    run = run_of(tmp_path_factory, "ep2_zero2")
    text = FIXTURE / "1790_george_washington_n.txt"
    export = tmp_path / "hf"
    convert("hf", run, export)
    out = tmp_path / "ours.json"
    cli("vqmoe_megatron.evaluate", "--checkpoint", run, "--text", text, "--json", out)
    ours = json.loads(out.read_text())["bpb"]
    theirs = lm_eval_bits_per_byte(export, text, tmp_path / "lm_eval")
    assert theirs == pytest.approx(ours, rel=1e-4)
