"""vqmoe-evaluate: the rolling text windows equal lm-evaluation-harness' own, held-out shards and
text files give consistent loss / perplexity / bits per byte with routing statistics in both
routing modes and for the baseline routers, and evaluation at EP = 2 (uneven data-parallel split) or TP = 2 equals one
process."""

from __future__ import annotations

import json
import math

import pytest
from convert_helpers import assert_one_error_line, cli, other_tokenizer, run_of, shards
from data_helpers import FIXTURE, shard_settings
from pretrain_helpers import trained_run

from vqmoe_megatron.data.sharding import build_shards
from vqmoe_megatron.evaluate import rolling_windows, window_batches

TEXTS = [FIXTURE / "1790_george_washington_n.txt", FIXTURE / "1791_george_washington_n.txt"]


@pytest.mark.parametrize("count", [0, 1, 5, 8, 9, 16, 17, 30])
def test_rolling_windows_equal_lm_eval(count):
    utils = pytest.importorskip("lm_eval.utils")
    tokens = list(range(10, 10 + count))
    ours = rolling_windows(tokens, prefix=2, length=8)
    theirs = [
        utils.make_disjoint_window(pair)
        for pair in utils.get_rolling_token_windows(tokens, 2, max_seq_len=8, context_len=1)
    ]
    assert len(ours) == len(theirs)
    for (window, scored), (context, continuation) in zip(ours, theirs):
        full = (context + continuation)[-9:]
        assert window == full and scored == len(continuation)
    assert sum(scored for _, scored in ours) == count


def test_window_batches_mask_only_the_scored_targets():
    windows = [([2, 10, 11, 12], 3), ([11, 12, 13], 1)]
    (batch,) = window_batches(windows, batch_size=4, pad_id=3, length=4)
    assert batch["tokens"].tolist() == [[2, 10, 11, 12, 3], [11, 12, 13, 3, 3]]
    assert batch["loss_mask"].tolist() == [[1, 1, 1, 0], [0, 1, 0, 0]]


def _evaluate(tmp_path, name, *args, nproc=1):
    out = tmp_path / f"{name}.json"
    proc = cli("vqmoe_megatron.evaluate", *args, "--json", out, nproc=nproc)
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("routing", ["pretrain", "discrete"])
def test_evaluate_shards_and_text(tmp_path_factory, tmp_path, routing):
    run = run_of(tmp_path_factory, "ep1_zero1")
    data = shards(tmp_path_factory)
    result, stdout = _evaluate(
        tmp_path, "shards", "--checkpoint", run, "--data-dir", data, "--routing", routing
    )
    manifest = json.loads((data / "manifest.json").read_text())["splits"]["valid"]
    assert result["routing"] == routing
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    assert result["bpb"] == pytest.approx(
        result["loss"] * result["tokens"] / math.log(2) / result["bytes"], rel=1e-9
    )
    assert abs(result["tokens"] - manifest["tokens"]) <= manifest["samples"]
    layers = result["layers"]
    assert sorted(layers) == ["1", "2"]
    assert layers["1"]["rows_per_token"] == pytest.approx(2.0 if routing == "pretrain" else 1.0)
    assert ("gate_discrete" in layers["1"]) == (routing == "pretrain")
    assert "code ppl" in stdout and f"bpb {result['bpb']:.4f}" in stdout
    text, _ = _evaluate(
        tmp_path, "text", "--checkpoint", run, "--text", *TEXTS, "--routing", routing
    )
    assert text["bytes"] == sum(len(p.read_bytes()) for p in TEXTS)
    assert 0 < text["bpb"] < 10 and math.isfinite(text["loss"])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", [("--expert-parallel", "2"), ("--tensor-parallel", "2")])
def test_parallel_evaluation_equals_one_process(tmp_path_factory, tmp_path, layout):
    run = run_of(tmp_path_factory, "ep2_zero2")
    args = ("--checkpoint", run, "--text", *TEXTS, "--batch-size", "7")
    single, _ = _evaluate(tmp_path, "one", *args)
    double, _ = _evaluate(tmp_path, "two", *args, *layout, nproc=2)
    assert ("EP 2" if "--expert-parallel" in layout else "TP 2") in double["layout"]
    assert double["tokens"] == single["tokens"]
    assert double["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert double["layers"]["1"]["tokens"] == single["layers"]["1"]["tokens"]


@pytest.mark.slow
def test_evaluate_refuses_data_of_another_vocabulary(tmp_path_factory, tmp_path):
    run = run_of(tmp_path_factory, "ep1_zero1")
    other = tmp_path / "shards"
    settings = shard_settings(tmp_path_factory, other, tokenizer=str(other_tokenizer(tmp_path)))
    build_shards(settings, progress=False, log=lambda _: None)
    proc = cli("vqmoe_megatron.evaluate", "--checkpoint", run, "--data-dir", other, check=False)
    assert_one_error_line(proc, "vocab_size", "384", "400")


@pytest.mark.slow
@pytest.mark.parametrize("router", ["topk", "hash"])
def test_evaluate_reports_routing_of_baseline_routers(tmp_path_factory, tmp_path, router):
    """Every router's layers report their tokens, expert load, imbalance and dead experts (the
    top-k baseline used to show 0 tokens); only routers with scores report their entropy, and
    codebook columns appear only where a codebook exists."""
    run = trained_run(
        tmp_path_factory, f"router_{router}", shards(tmp_path_factory), f"moe.router={router}"
    )
    result, stdout = _evaluate(tmp_path, router, "--checkpoint", run, "--text", *TEXTS)
    vqmoe, _ = _evaluate(
        tmp_path, "vqmoe", "--checkpoint", run_of(tmp_path_factory, "ep1_zero1"), "--text", *TEXTS
    )
    assert sorted(result["layers"]) == ["1", "2"]
    for stats in result["layers"].values():
        # every non-padding input token is routed, scored or context: as many as VQMoE routes
        assert stats["tokens"] == vqmoe["layers"]["1"]["tokens"] >= result["tokens"]
        assert stats["rows_per_token"] == pytest.approx(1.0)  # tiny.yaml: top-1
        assert sum(stats["expert_load"]) == pytest.approx(1.0)
        assert stats["imbalance"] >= 1.0 and 0 <= stats["dead_experts"] < 4
        assert ("router_entropy" in stats) == (router == "topk")
        assert "code_perplexity" not in stats and "agreement" not in stats
    assert "dead exp" in stdout


@pytest.mark.slow
def test_routing_fluctuation_between_checkpoints(tmp_path_factory, tmp_path):
    """Consecutive checkpoints of a run each give a share in [0, 1] per layer; a checkpoint
    against itself gives 0; a given pair gives what the consecutive table says for it."""
    run = trained_run(
        tmp_path_factory,
        "saved_every_step",
        shards(tmp_path_factory),
        "train.save_interval=1",
        "train.keep_last=3",
    )
    data = ("--text", *TEXTS, "--max-batches", "2")
    table, stdout = _evaluate(tmp_path, "run", "--checkpoint", run, "--fluctuation", *data)
    pairs = table["fluctuation"]
    assert [p["after"].split("step_")[-1][:8] for p in pairs] == ["00000002", "00000003"]
    for pair in pairs:
        assert sorted(pair["layers"]) == ["1", "2"] and pair["tokens"] > 0
        assert all(0 <= share <= 1 for share in pair["layers"].values())
        assert pair["overall"] == pytest.approx(sum(pair["layers"].values()) / 2)
    assert "overall" in stdout and "layer1" in stdout
    steps = run / "checkpoints"
    one, _ = _evaluate(
        tmp_path,
        "pair",
        "--checkpoint",
        steps / "step_00000002",
        "--fluctuation",
        steps / "step_00000002",
        steps / "step_00000003",
        *data,
    )
    assert one["fluctuation"][0]["overall"] == 0.0
    assert one["fluctuation"][1]["layers"] == pairs[1]["layers"]


def test_fluctuation_pairs_consecutive_complete_checkpoints(tmp_path):
    from vqmoe_megatron.checkpoint.training import COMPLETE
    from vqmoe_megatron.evaluate import _checkpoint_pairs, _parser

    steps = tmp_path / "run" / "checkpoints"
    for step, complete in ((10, True), (2, True), (30, False), (20, True)):
        (steps / f"step_{step:08d}").mkdir(parents=True)
        if complete:
            (steps / f"step_{step:08d}" / COMPLETE).touch()
    args = _parser().parse_args(
        ["--checkpoint", str(tmp_path / "run"), "--fluctuation", "--text", "x"]
    )
    names = [(a.name, b.name) for a, b in _checkpoint_pairs(args)]
    assert names == [("step_00000002", "step_00000010"), ("step_00000010", "step_00000020")]
    args.checkpoint = steps / "step_00000002"
    with pytest.raises(ValueError, match="at least two complete checkpoints"):
        _checkpoint_pairs(args)
    args.fluctuation = [steps / "step_00000010"]
    assert _checkpoint_pairs(args) == [(steps / "step_00000002", steps / "step_00000010")]


def test_fluctuation_refuses_several_processes(tmp_path):
    proc = cli(
        "vqmoe_megatron.evaluate",
        "--checkpoint",
        tmp_path,
        "--fluctuation",
        "--text",
        TEXTS[0],
        "--expert-parallel",
        "2",
        check=False,
    )
    assert_one_error_line(proc, "--fluctuation runs in one process")
