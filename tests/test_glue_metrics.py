"""GLUE metrics in numpy against scikit-learn and scipy, including ties and degenerate inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from vqmoe_megatron.glue.metrics import (
    METRICS,
    accuracy,
    check_predictions,
    compute_task_metrics,
    f1_score,
    matthews_corrcoef,
    pearson,
    spearman,
)
from vqmoe_megatron.glue.tasks import TASKS

RNG_SEEDS = range(25)


def _random_classes(seed: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    size = int(rng.integers(2, 60))
    labels = rng.integers(0, classes, size)
    flip = rng.random(size) < rng.random()
    return np.where(flip, rng.integers(0, classes, size), labels), labels


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_classification_metrics_match_sklearn(seed):
    pred, gold = _random_classes(seed, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on its own degenerate cases
        assert accuracy(pred, gold) == pytest.approx(skm.accuracy_score(gold, pred))
        assert f1_score(pred, gold) == pytest.approx(skm.f1_score(gold, pred))
        assert matthews_corrcoef(pred, gold) == pytest.approx(skm.matthews_corrcoef(gold, pred))
        pred3, gold3 = _random_classes(seed, 3)
        assert matthews_corrcoef(pred3, gold3) == pytest.approx(skm.matthews_corrcoef(gold3, pred3))


@pytest.mark.parametrize("seed", RNG_SEEDS)
@pytest.mark.parametrize("tied", [False, True])
def test_correlations_match_scipy(seed, tied):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(3, 80))
    gold = rng.integers(0, 6, size).astype(float) if tied else rng.uniform(0, 5, size)
    pred = gold + rng.normal(0, rng.uniform(0.1, 3), size)
    if tied:
        pred = np.round(pred)
    if np.all(pred == pred[0]):
        pred[0] += 1
    assert pearson(pred, gold) == pytest.approx(stats.pearsonr(pred, gold)[0], abs=1e-12)
    assert spearman(pred, gold) == pytest.approx(stats.spearmanr(pred, gold)[0], abs=1e-12)


def test_spearman_uses_average_ranks_for_ties():
    pred, gold = [1, 2, 2, 2, 3, 3], [1, 2, 3, 4, 5, 6]
    assert spearman(pred, gold) == pytest.approx(stats.spearmanr(pred, gold)[0], abs=1e-12)
    assert spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [9, 4, 1]) == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "pred,gold",
    [
        ([1, 1, 1, 1], [0, 1, 0, 1]),  # constant prediction
        ([0, 1, 0, 1], [0, 0, 0, 0]),  # constant labels
        ([1, 1, 1], [1, 1, 1]),  # perfect but a single class
    ],
)
def test_mcc_is_zero_when_undefined_like_sklearn(pred, gold):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert skm.matthews_corrcoef(gold, pred) == 0.0
    assert matthews_corrcoef(pred, gold) == 0.0


def test_f1_without_any_positive_is_zero_like_sklearn():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert skm.f1_score([0, 0, 0], [0, 0, 0]) == 0.0
    assert f1_score([0, 0, 0], [0, 0, 0]) == 0.0
    assert f1_score([1, 1], [1, 1]) == 1.0


@pytest.mark.parametrize("constant", [[2.0, 2.0, 2.0], [0.1] * 7])
def test_correlation_with_constant_input_is_zero_where_scipy_gives_nan(constant):
    other = np.arange(len(constant), dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(stats.pearsonr(constant, other)[0])
    for metric in (pearson, spearman):
        assert metric(constant, other) == 0.0
        assert metric(other, constant) == 0.0


def test_input_errors():
    with pytest.raises(ValueError, match="equal length"):
        accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="at least 1"):
        accuracy([], [])
    with pytest.raises(ValueError, match="at least 2"):
        pearson([1.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        spearman([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="binary"):
        f1_score([0, 2], [0, 1])
    with pytest.raises(ValueError, match="integer class ids"):
        accuracy([0.0, 1.0], [0, 1])


def test_every_task_metric_is_implemented():
    for task in TASKS.values():
        assert set(task.metrics) <= set(METRICS), task.name


@pytest.mark.parametrize(
    "task,keys",
    [
        ("CoLA", {"mcc"}),
        ("SST-2", {"accuracy"}),
        ("MRPC", {"f1", "accuracy", "combined"}),
        ("STS-B", {"pearson", "spearmanr", "combined"}),
        ("QQP", {"f1", "accuracy", "combined"}),
        ("MNLI", {"accuracy"}),
        ("QNLI", {"accuracy"}),
        ("RTE", {"accuracy"}),
        ("WNLI", {"accuracy"}),
    ],
)
def test_compute_task_metrics_uses_glue_names(task, keys):
    spec = TASKS[task]
    rng = np.random.default_rng(0)
    if spec.is_regression:
        gold = rng.uniform(0, 5, 40)
        pred = gold + rng.normal(0, 1, 40)
    else:
        pred, gold = _random_classes(1, spec.num_labels)
    result = compute_task_metrics(task, pred, gold)
    assert set(result) == keys
    assert spec.main_metric in result
    if "combined" in result:
        parts = [value for name, value in result.items() if name != "combined"]
        assert result["combined"] == pytest.approx(np.mean(parts))
    for name in spec.metrics:
        assert result[name] == METRICS[name](pred, gold)


@pytest.mark.parametrize(
    "task,predictions,message",
    [
        ("SST-2", np.array([[0.2, 0.8], [0.9, 0.1]]), "must be 1-d"),
        ("SST-2", np.array([0.8, 0.1]), "class ids 0..1"),
        ("MNLI", [0, 3], "class ids 0..2"),
        ("RTE", [-1, 0], "class ids 0..1"),
        ("STS-B", [1.0, np.inf], "finite scores"),
    ],
)
def test_check_predictions_refuses_logits_and_out_of_range_ids(task, predictions, message):
    with pytest.raises(ValueError, match=message):
        check_predictions(task, predictions)
