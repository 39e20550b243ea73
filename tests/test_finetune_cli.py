"""finetune/glue.py end to end on CPU (a tiny pretrained model, gloo): the outputs of a run, all
nine GLUE tasks, a consolidated checkpoint, bad input, preemption with an exact resume, and the
DeepSpeed launcher with the router kept (the ablation) in bf16."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from convert_helpers import assert_one_error_line, convert, other_tokenizer, run_of
from data_helpers import FIXTURE
from dist_utils import torchrun
from finetune_helpers import (
    FINETUNE,
    GLUE_FIXTURES,
    finetune,
    finetune_args,
    glue_copy,
    sentence_task,
)
from moe_helpers import init_single_process
from pretrain_helpers import records, run_and_signal_one_rank
from safetensors.torch import load_file

from vqmoe_megatron.checkpoint.opened import open_checkpoint
from vqmoe_megatron.checkpoint.training import find_latest
from vqmoe_megatron.convert.source import with_layout
from vqmoe_megatron.data.tokenizer_training import TokenizerSettings, train_tokenizer
from vqmoe_megatron.finetune.classifier import SequenceClassifier
from vqmoe_megatron.glue import TASKS, read_predictions, read_split
from vqmoe_megatron.model import build_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    return run_of(tmp_path_factory, "ep1_zero1")


@pytest.fixture(scope="module")
def sst2_run(pretrained, tmp_path_factory) -> tuple[Path, Path]:
    """The fixture SST-2 (4 training rows) for 2 epochs of 2 steps: (GLUE folder, run dir)."""
    root = tmp_path_factory.mktemp("sst2")
    data = glue_copy(root / "glue")
    out = root / "run"
    finetune("sst2", data, pretrained, out, "--epochs", "2", "--micro_batch_size", "2")
    return data, out


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_a_run_writes_results_predictions_and_the_best_model(sst2_run):
    data, out = sst2_run
    results = _results(out)
    assert results["task"] == "SST-2" and results["main_metric"] == "accuracy"
    assert results["steps"] == 4 and results["steps_per_epoch"] == 2
    scores = [e["dev/accuracy"] for e in results["evaluations"]]
    assert [e["step"] for e in results["evaluations"]] == [2, 4]
    assert results["best"]["score"] == max(scores) and results["best"]["step"] in (2, 4)
    assert results["best"]["dev"]["dev"]["accuracy"] == results["best"]["score"]
    dev_labels = [e.label for e in read_split(data, "SST-2", "dev").examples]
    train_labels = [e.label for e in read_split(data, "SST-2", "train").examples]
    majority = max(set(train_labels), key=train_labels.count)
    assert results["baseline"]["dev"]["accuracy"] == dev_labels.count(majority) / len(dev_labels)
    assert results["settings"]["routing"] == "discrete" and results["settings"]["pooling"] == "last"

    submission = out / results["test_predictions"]["test"]
    assert submission == out / "predictions" / "SST-2.tsv"
    assert submission.read_text().splitlines()[0] == "index\tprediction"
    indices, predicted = read_predictions(submission, "SST-2")
    assert indices == [e.guid for e in read_split(data, "SST-2", "test").examples]
    assert set(predicted.tolist()) <= {0, 1}

    assert (out / "complete").is_file() and not (out / "preempted").exists()
    assert find_latest(out / "checkpoints").name == "step_00000004"
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] == results["best"]["step"]
    assert {"model.safetensors", "config.yaml", "tokenizer.model"} <= {
        p.name for p in (out / "best").iterdir()
    }
    config = (out / "config.yaml").read_text()
    assert "routing_mode: discrete" in config and "task: SST-2" in config
    assert "steps: 4" in config  # train.steps derived from the epochs
    train = records(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["layer1/rows_per_token"] == r["layer2/rows_per_token"] == 1.0 for r in train)


EXPECTED_METRICS = {
    "CoLA": {"mcc"},
    "STS-B": {"pearson", "spearmanr", "combined"},
    "MRPC": {"f1", "accuracy", "combined"},
    "QQP": {"f1", "accuracy", "combined"},
}


def test_all_nine_tasks_report_their_metrics_and_submission_files(pretrained, tmp_path):
    torchrun(
        "finetune_all_tasks.py",
        1,
        "--data_dir",
        str(glue_copy(tmp_path / "glue")),
        "--pretrained",
        str(pretrained),
        "--out",
        str(tmp_path / "runs"),
    )
    for name, task in TASKS.items():
        results = _results(tmp_path / "runs" / name)
        assert results["task"] == name
        dev = results["best"]["dev"]
        assert sorted(dev) == sorted(task.dev_splits), name
        for values in dev.values():
            assert set(values) == EXPECTED_METRICS.get(name, {"accuracy"}), name
        assert results["best"]["score"] == pytest.approx(dev[task.dev_splits[0]][task.main_metric])
        files = sorted(Path(p).name for p in results["test_predictions"].values())
        assert files == sorted(s.submission for s in task.splits if s.is_test), name
        for split_name, relative in results["test_predictions"].items():
            indices, values = read_predictions(tmp_path / "runs" / name / relative, name)
            split = read_split(tmp_path / "glue", name, split_name)
            assert indices == [e.guid for e in split.examples], name
            if name == "STS-B":
                assert ((values >= 0) & (values <= 5)).all()
    mnli = (tmp_path / "runs" / "MNLI" / "predictions" / "MNLI-m.tsv").read_text().split()
    assert set(mnli[3::2]) <= {"contradiction", "entailment", "neutral"}


def test_a_consolidated_checkpoint_fine_tunes_exactly_like_the_training_one(
    pretrained, sst2_run, tmp_path
):
    data, reference = sst2_run
    consolidated = tmp_path / "consolidated"
    convert("consolidated", pretrained, consolidated)
    out = tmp_path / "run"
    finetune("sst2", data, consolidated, out, "--epochs", "2", "--micro_batch_size", "2")
    assert [(r["step"], r["loss"]) for r in records(out)] == [
        (r["step"], r["loss"]) for r in records(reference)
    ]
    assert _results(out)["best"]["dev"] == _results(reference)["best"]["dev"]


def _replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_bad_glue_files_are_one_clear_error_and_nothing_is_written(pretrained, tmp_path):
    data = glue_copy(tmp_path / "glue")
    out = tmp_path / "never"
    (data / "RTE" / "test.tsv").unlink()
    proc = finetune("rte", data, pretrained, out, check=False)
    assert_one_error_line(proc, str(data / "RTE" / "test.tsv"), "train.tsv, dev.tsv, test.tsv")
    _replace_line(data / "SST-2" / "train.tsv", 1, "text\tlabel")
    proc = finetune("sst2", data, pretrained, out, check=False)
    assert_one_error_line(
        proc, str(data / "SST-2" / "train.tsv"), "header is ['text', 'label']", "sentence"
    )
    shutil.copy(GLUE_FIXTURES / "SST-2" / "train.tsv", data / "SST-2")
    first_dev_row = (data / "SST-2" / "dev.tsv").read_text().splitlines()[1]
    _replace_line(data / "SST-2" / "dev.tsv", 2, first_dev_row.rsplit("\t", 1)[0] + "\t2")
    proc = finetune("sst2", data, pretrained, out, check=False)
    assert_one_error_line(
        proc, f"{data / 'SST-2' / 'dev.tsv'} line 2", "unknown SST-2 label '2'", "'0', '1'"
    )
    proc = finetune("sst3", data, pretrained, out, check=False)
    assert_one_error_line(proc, "unknown GLUE task 'sst3'", "SST-2")
    assert not out.exists()


def test_a_tokenizer_or_checkpoint_that_does_not_fit_is_one_clear_error(pretrained, tmp_path):
    data = glue_copy(tmp_path / "glue")
    out = tmp_path / "never"
    smaller = other_tokenizer(tmp_path)
    proc = finetune("sst2", data, pretrained, out, "--tokenizer", str(smaller), check=False)
    assert_one_error_line(proc, f"tokenizer {smaller} has 384 pieces", "model.vocab_size=400")
    other = tmp_path / "other"
    train_tokenizer(
        TokenizerSettings(
            inputs=[str(p) for p in sorted(FIXTURE.glob("17*.txt"))],
            output_prefix=str(other),
            vocab_size=400,
        ),
        progress=False,
    )
    proc = finetune("sst2", data, pretrained, out, "--tokenizer", f"{other}.model", check=False)
    assert_one_error_line(
        proc, "was trained with the tokenizer", f"this run uses {other}.model", "sha256"
    )
    proc = finetune("sst2", data, pretrained, out, "model.hidden_size=96", check=False)
    assert_one_error_line(proc, "model.hidden_size: checkpoint 64, given 96", str(pretrained))
    proc = finetune("sst2", data, tmp_path / "missing", out, check=False)
    assert_one_error_line(proc, f"{tmp_path / 'missing'} does not exist")

    consolidated = tmp_path / "consolidated"
    convert("consolidated", pretrained, consolidated)
    config = consolidated / "config.yaml"
    config.write_text(
        config.read_text().replace("expert_ffn_hidden_size: 128", "expert_ffn_hidden_size: 96")
    )
    (consolidated / "conversion.json").unlink()  # else its size record names config.yaml
    proc = finetune("sst2", data, consolidated, out, check=False)
    assert_one_error_line(
        proc,
        f"{consolidated / 'model.safetensors'} does not fit the model its config describes",
        # expert weights per expert (128, 64) or stacked (E, 128, 64), by expert backend
        "128, 64) in the file, (",
        "96, 64) expected",
    )
    assert not (out / "checkpoints").exists() and not (out / "results.json").exists()


def test_a_fine_tuned_run_is_the_pretrained_model_of_another_task(sst2_run, tmp_path):
    """Intermediate-task fine-tuning: RTE from the SST-2 run directory (its newest training
    checkpoint: backbone and codebooks, a new head), SST-2 again from the run's best/ model (its
    head too)."""
    data, sst2_out = sst2_run
    rte = tmp_path / "rte"
    proc = finetune("rte", data, sst2_out, rte, "--steps", "2", "--micro_batch_size", "2")
    assert "fine-tuned on SST-2 (2 labels, last pooling)" in proc.stdout
    assert "its head is dropped and a new RTE head (2 labels, last pooling)" in proc.stdout
    assert _results(rte)["task"] == "RTE" and _results(rte)["settings"]["routing"] == "discrete"
    again = tmp_path / "sst2"
    proc = finetune(
        "sst2", data, sst2_out / "best", again, "--steps", "1", "--micro_batch_size", "2"
    )
    assert "with the SST-2 head it was fine-tuned with" in proc.stdout

    init_single_process()
    opened = open_checkpoint(sst2_out)
    assert opened.path == find_latest(sst2_out / "checkpoints")
    assert (opened.kind, opened.task.task, opened.routing_mode) == ("training", "SST-2", "discrete")
    cfg = with_layout(opened.cfg, 1, 1)
    saved = SequenceClassifier(
        build_model(cfg.model, cfg.moe, cfg.parallel, seed=5), 2, "last", 0, 5
    )
    opened.load_weights(saved, cfg, with_head=True)  # the whole model, as a resume loads it
    trunk = build_model(cfg.model, cfg.moe, cfg.parallel, seed=6)
    opened.load_weights(trunk, cfg)
    expected = saved.gpt.state_dict()
    for name, value in trunk.state_dict().items():
        if not name.endswith("_extra_state"):
            torch.testing.assert_close(value, expected[name], msg=name)


def test_a_run_directory_of_another_task_is_refused_and_left_alone(pretrained, sst2_run, tmp_path):
    data, sst2_out = sst2_run
    out = Path(shutil.copytree(sst2_out, tmp_path / "run"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = finetune("rte", data, pretrained, out, check=False)
    assert_one_error_line(
        proc, "finetune.task: checkpoint 'SST-2', config 'RTE'", "refusing to resume"
    )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.distributed
def test_sigterm_mid_run_saves_and_the_rerun_continues_exactly(pretrained, tmp_path):
    """2 ranks, EP = 2, ZeRO-2, 13 steps per epoch: a run whose rank 1 gets SIGTERM, then is
    started again, logs the losses and dev scores of an uninterrupted run and predicts alike."""
    data = sentence_task(tmp_path / "glue", train=100, dev=40)
    extra = ("--steps", "24", "--micro_batch_size", "4", "parallel.expert_parallel=2")
    reference = tmp_path / "reference"
    finetune("sst2", data, pretrained, reference, *extra, nproc=2, launcher="torchrun")
    out = tmp_path / "killed"
    args = finetune_args("sst2", data, pretrained, out, *extra)
    code, output = run_and_signal_one_rank(FINETUNE, args, out, after_step=3)
    assert code == 0, output[-3000:]
    stopped = int((out / "preempted").read_text().split()[1])
    assert 3 <= stopped < 24
    assert find_latest(out / "checkpoints").name == f"step_{stopped:08d}"
    assert not (out / "complete").exists() and not (out / "results.json").exists()
    rerun = finetune("sst2", data, pretrained, out, *extra, nproc=2, launcher="torchrun")
    assert f"at step {stopped}" in rerun.stdout
    assert (out / "complete").exists() and not (out / "preempted").exists()

    def by_step(run: Path, kind: str) -> dict:
        drop = ("time", "examples_per_s", "step_time_s")
        rows = {
            r["step"]: {k: v for k, v in r.items() if k not in drop} for r in records(run, kind)
        }
        return rows

    assert by_step(out, "train") == by_step(reference, "train")
    assert by_step(out, "eval") == by_step(reference, "eval")
    assert sorted(by_step(out, "eval")) == [13, 24]
    assert _results(out)["best"] == _results(reference)["best"]
    assert (out / "predictions" / "SST-2.tsv").read_text() == (
        reference / "predictions" / "SST-2.tsv"
    ).read_text()


@pytest.mark.distributed
def test_deepspeed_launcher_keeps_the_router_for_the_ablation_in_bf16(pretrained, tmp_path):
    data = glue_copy(tmp_path / "glue")
    out = tmp_path / "run"
    proc = finetune(
        "rte",
        data,
        pretrained,
        out,
        "--routing",
        "pretrain",
        "--train_codebook",
        "--steps",
        "2",
        "--micro_batch_size",
        "1",
        "train.precision=bf16",
        "train.zero_stage=1",
        nproc=2,
        launcher="deepspeed",
    )
    assert "world 2" in proc.stdout + proc.stderr
    results = _results(out)
    assert results["settings"]["routing"] == "pretrain" and results["settings"]["train_codebook"]
    weights = load_file(str(out / "best" / "model.safetensors"))
    assert any(".router.gate." in k for k in weights)
    assert any(".router.continuous." in k for k in weights)
    assert all(r["layer1/rows_per_token"] == 2.0 for r in records(out))
    assert (out / "predictions" / "RTE.tsv").is_file()
