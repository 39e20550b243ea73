"""``vqmoe-compare``: the variants and their commands, the aggregation over seeds, the report's
verdicts on hand-made numbers, and one small real comparison (2 routers, 1 seed, a few steps)
that is interrupted, resumed, never overwritten, and refused with other settings."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from convert_helpers import shards
from dist_utils import child_env
from finetune_helpers import glue_copy
from pretrain_helpers import CONFIG, REPO

from vqmoe_megatron.compare.cli import build_parser, command_line, settings_of
from vqmoe_megatron.compare.plan import CompareSettings, plan_unit
from vqmoe_megatron.compare.report import ablation_lines, router_free_rows, where_vqmoe_loses
from vqmoe_megatron.compare.results import Spread, UnitResult, aggregate
from vqmoe_megatron.compare.runner import CompareError, claim
from vqmoe_megatron.compare.variants import VARIANTS, select
from vqmoe_megatron.config import MoEConfig


def settings(**changes) -> CompareSettings:
    base = dict(
        config="pretrain/configs/tiny.yaml",
        variants=["vqmoe", "topk"],
        seeds=2,
        steps=100,
        data_dir="shards",
        glue_dir="glue",
    )
    return CompareSettings(**{**base, **changes})


def test_every_router_setting_has_a_variant():
    routers = typing.get_args(typing.get_type_hints(MoEConfig)["router"])
    assert set(routers) <= set(VARIANTS)
    assert {"vqmoe_token_input", "vqmoe_ema"} <= set(VARIANTS)


def test_select_refuses_unknown_and_repeated_variants():
    assert [v.name for v in select(["hash", "vqmoe"])] == ["hash", "vqmoe"]
    with pytest.raises(ValueError, match="unknown variant.*nope"):
        select(["vqmoe", "nope"])
    with pytest.raises(ValueError, match="named twice: topk"):
        select(["topk", "topk"])


def test_unit_commands_share_data_budget_and_seed(tmp_path):
    s = settings(overrides=["moe.stablemoe_stage1_steps=7", "data.micro_batch_size=4"])
    stable = plan_unit(s, VARIANTS["stablemoe"], 2, tmp_path)
    pretrain = stable.steps[0].command
    for expected in ("train.steps=100", "train.seed=2", "data.seed=2", "data.data_dir=shards"):
        assert expected in pretrain
    # the budget-derived stage 1 (10% of the steps) comes first, the user's override wins
    assert pretrain.index("moe.stablemoe_stage1_steps=10") < pretrain.index(
        "moe.stablemoe_stage1_steps=7"
    )
    assert pretrain[-1] == "data.micro_batch_size=4"
    assert "train.keep_last=6" in pretrain  # all 5 checkpoints kept for fluctuation
    ramp = plan_unit(s, VARIANTS["smoe_dropout"], 1, tmp_path).steps[0].command
    assert "moe.smoe_dropout_ramp_steps=100" in ramp

    vq = plan_unit(s, VARIANTS["vqmoe"], 1, tmp_path)
    assert [step.name for step in vq.steps] == [
        "pretrain",
        "evaluate (pretrain routing)",
        "evaluate (discrete routing)",
        "routing fluctuation (pretrain routing)",
        "routing fluctuation (discrete routing)",
        "fine-tune sst2 (default)",
        "fine-tune sst2 (codebook_trained)",
        "fine-tune sst2 (router_kept)",
    ]
    assert "--train_codebook" in vq.steps[6].command
    assert vq.steps[7].command[-2:] == ["--routing", "pretrain"]
    assert all("train.seed=1" in step.command for step in vq.steps[5:])

    dense = plan_unit(s, VARIANTS["dense"], 1, tmp_path)
    assert [step.name for step in dense.steps] == [
        "pretrain",
        "evaluate (pretrain routing)",
        "fine-tune sst2 (default)",
    ]
    no_glue = plan_unit(settings(glue_dir=None), VARIANTS["topk"], 1, tmp_path)
    assert not any(step.name.startswith("fine-tune") for step in no_glue.steps)


def unit(name: str, seed: int, **metrics: float) -> UnitResult:
    return UnitResult(VARIANTS[name], seed, metrics=dict(metrics))


def test_aggregate_is_mean_and_sample_std_over_seeds():
    table = aggregate(
        [
            unit("vqmoe", 1, bpb=2.0, only_here=1.0),
            unit("vqmoe", 2, bpb=2.2),
            unit("vqmoe", 3, bpb=2.4),
            unit("topk", 1, bpb=3.0),
        ]
    )
    assert table["vqmoe"]["bpb"].mean == pytest.approx(2.2)
    assert table["vqmoe"]["bpb"].std == pytest.approx(0.2)
    assert table["vqmoe"]["bpb"].n == 3
    assert "only_here" not in table["vqmoe"]  # a metric some seed lacks is not averaged
    assert table["topk"]["bpb"] == Spread(3.0, 0.0, 1)
    assert table["topk"]["bpb"].format() == "3.0000"


def test_report_says_where_vqmoe_is_beaten_and_by_how_much():
    table = {
        "vqmoe": {
            "bpb/pretrain": Spread(2.50, 0.01, 3),
            "bpb/discrete": Spread(2.45, 0.01, 3),  # its better mode counts
            "finetune/default": Spread(0.80, 0.01, 3),
            "params/active/as_trained": Spread(1000.0, 0.0, 3),
        },
        "topk": {
            "bpb/pretrain": Spread(2.40, 0.01, 3),  # clearly ahead
            "finetune/default": Spread(0.805, 0.01, 3),  # ahead within the spread
            "params/active/as_trained": Spread(900.0, 0.0, 3),
        },
        "hash": {"bpb/pretrain": Spread(2.60, 0.01, 3)},
    }
    lines = "\n".join(where_vqmoe_loses(table))
    assert "VQMoE (2.4500 ± 0.0100) is beaten by `topk` (2.4000 ± 0.0100)." in lines
    assert "`topk` (0.8050 ± 0.0100, within the seed spread)" in lines
    assert "VQMoE (1000 ± 0) is beaten by `topk` (900 ± 0)." in lines  # fewer active params
    assert "hash" not in lines
    assert where_vqmoe_loses({"topk": table["topk"]}) == [
        "- `vqmoe` was not part of this comparison."
    ]


def test_ablation_rows_are_differences_of_the_named_metrics():
    table = {
        "vqmoe": {"bpb/pretrain": Spread(2.5, 0.03, 3), "bpb/discrete": Spread(2.6, 0.04, 3)},
    }
    (line,) = ablation_lines(table)
    assert "router kept → router dropped" in line
    assert "(Δ +0.1000, seed std 0.0500)" in line


def test_router_free_table_compares_dropped_with_top1_and_kept_with_top2():
    table = {
        "vqmoe": {
            "bpb/pretrain": Spread(2.40, 0.03, 3),
            "bpb/discrete": Spread(2.64, 0.04, 3),
            "finetune/default": Spread(0.72, 0.0, 3),
        },
        "vq_only": {"bpb/discrete": Spread(2.47, 0.0, 3)},
        "topk": {"bpb/pretrain": Spread(2.46, 0.0, 3)},
        "topk2": {"bpb/pretrain": Spread(2.41, 0.0, 3), "finetune/default": Spread(0.69, 0.0, 3)},
    }
    vq, scratch = router_free_rows(table)
    assert vq == [
        "`vqmoe`",
        "2.4000 ± 0.0300",
        "2.6400 ± 0.0400",
        "+10.00%",
        "+0.1800 (±0.0400)",
        "-0.0100 (±0.0300)",
        "+0.0300 (±0.0000)",
    ]
    assert scratch[0] == "`vq_only`" and scratch[1] == "–" and scratch[3] == "–"
    assert scratch[4] == "+0.0100 (±0.0000)"


def test_the_report_command_remakes_the_same_settings(tmp_path):
    """The command written into report.md spells every setting out: parsed again it gives the
    comparison's settings, whatever the defaults become."""
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    (tmp_path / "glue").mkdir()
    original = settings(
        config=str(CONFIG),
        data_dir=str(tmp_path / "shards"),
        glue_dir=str(tmp_path / "glue"),
        variants=["hash", "vqmoe_ema"],
        first_seed=4,
        overrides=["data.micro_batch_size=4"],
    )
    words = shlex.split(command_line(original, tmp_path / "out"))
    assert words[0] == "vqmoe-compare"
    args = build_parser().parse_args(words[1:])
    assert settings_of(args) == original and args.out == tmp_path / "out"


def test_claim_refuses_a_directory_made_with_other_settings(tmp_path):
    out, work = tmp_path / "report", tmp_path / "runs"
    claim(settings(), out, work)
    claim(settings(), out, work)  # the same settings: resume
    with pytest.raises(CompareError, match=r"steps: 100 -> 200.*another --out"):
        claim(settings(steps=200), out, work)
    with pytest.raises(CompareError, match=r"variants: \['vqmoe', 'topk'\] -> \['vqmoe'\]"):
        claim(settings(variants=["vqmoe"]), tmp_path / "other", work)


def compare_command(data: Path, glue: Path, out: Path, work: Path, steps: int = 6) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vqmoe_megatron.compare",
        "--config",
        str(CONFIG),
        "--data-dir",
        str(data),
        "--glue-dir",
        str(glue),
        "--routers",
        "vqmoe,topk",
        "--seeds",
        "1",
        "--steps",
        str(steps),
        "--checkpoints",
        "2",
        "--evaluations",
        "2",
        "--finetune-steps",
        "2",
        "--jobs",
        "2",
        "--out",
        str(out),
        "--workdir",
        str(work),
        "train.log_interval=1",
        "train.eval_batches=2",
    ]


def run_compare(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=900, env=child_env(), cwd=REPO
    )


def interrupt_after_first_step(command: list[str], work: Path) -> subprocess.CompletedProcess:
    """Start the comparison in its own process group and Ctrl-C the group (as a terminal
    does) once the first unit's evaluation started, that is its pretraining finished."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=REPO,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while not list((work / "logs").glob("*evaluate*")) and proc.poll() is None:
        assert time.time() < deadline, "the comparison never reached an evaluation"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_a_small_comparison_reports_resumes_and_never_overwrites(tmp_path_factory, tmp_path):
    data, glue = shards(tmp_path_factory), glue_copy(tmp_path / "glue")
    out, work = tmp_path / "report", tmp_path / "runs"
    command = compare_command(data, glue, out, work)

    stopped = interrupt_after_first_step(command, work)
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert "run the same command again to continue" in stopped.stderr
    assert not (out / "report.md").exists()

    finished = run_compare(command)
    assert finished.returncode == 0, finished.stdout + finished.stderr[-3000:]
    assert "pretrain: done already" in finished.stdout  # resumed, not redone
    report = (out / "report.md").read_text()
    for row in ("| `vqmoe` | pretrain |", "| `vqmoe` | discrete |", "| `topk` | pretrain |"):
        assert row in report
    assert "## Where VQMoE does not win" in report
    assert "router kept → router dropped" in report
    assert "python pretrain/pretrain_vqmoe.py --config" in report
    for plot in ("validation_loss", "expert_load", "codebook_usage", "fluctuation", "headline"):
        png = out / f"{plot}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{plot}]({plot}.png)" in report
    results = json.loads((out / "results.json").read_text())
    runs = {(r["variant"], r["seed"]): r for r in results["runs"]}
    assert set(runs) == {("vqmoe", 1), ("topk", 1)}
    vq = runs[("vqmoe", 1)]
    for key in ("bpb/pretrain", "bpb/discrete", "fluctuation/discrete", "finetune/router_kept"):
        assert math.isfinite(vq[key]), key
    assert vq["experts_per_token/pretrain"] == 2.0 and vq["experts_per_token/discrete"] == 1.0
    assert 0.0 <= runs[("topk", 1)]["fluctuation/pretrain"] <= 1.0
    assert (work / "compare.yaml").is_file() and (out / "compare.yaml").is_file()

    written = (out / "report.md").stat().st_mtime_ns
    again = run_compare(command)
    assert again.returncode == 0 and "never overwritten" in again.stdout
    assert (out / "report.md").stat().st_mtime_ns == written

    other = run_compare(compare_command(data, glue, out, work, steps=8))
    assert other.returncode == 2
    assert "holds a comparison made with other settings (steps: 6 -> 8)" in other.stderr

    # a lost result is made again, and only it: the report is then written anew
    (out / "report.md").unlink()
    (work / "topk" / "seed1" / "eval_pretrain.json").unlink()
    redo = run_compare(command)
    assert redo.returncode == 0, redo.stderr[-3000:]
    ran = [
        line for line in redo.stdout.splitlines() if line.startswith("[compare") and " s" in line
    ]
    ran = [line for line in ran if "done already" not in line]
    assert len(ran) == 1 and "topk seed 1: evaluate (pretrain routing)" in ran[0]
    assert (out / "report.md").is_file()


def test_bad_settings_end_in_one_error_line(tmp_path):
    base = [sys.executable, "-m", "vqmoe_megatron.compare", "--config", str(CONFIG)]
    cases = [
        (["--steps", "5", "--data-dir", str(tmp_path), "--no-finetune"], "holds no manifest.json"),
        (["--steps", "5", "--routers", "vqmoe,bogus"], "unknown variant(s) bogus"),
        (["--steps", "0"], "--steps 0: use a number >= 1"),
        (["--steps", "5", "moe.topk=two"], "moe.topk"),
        (["--steps", "5"], "sets no data.data_dir: give --data-dir"),
    ]
    for args, fragment in cases:
        proc = run_compare([*base, *args, "--out", str(tmp_path / "r")])
        assert proc.returncode == 2, (args, proc.stderr)
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith("error: ") and fragment in line, (args, line)
    assert not (tmp_path / "r").exists()
