"""GLUE's metrics in numpy, under GLUE's names, and the per-task set of them.

scikit-learn and scipy are not runtime dependencies; the tests check these functions against
them. Where a metric is undefined the functions return 0.0 rather than NaN, so that checkpoint
selection always compares numbers:

- Matthews correlation with a constant prediction or constant labels: 0.0 (as scikit-learn).
- F1 with no positive label and no positive prediction: 0.0 (as scikit-learn's default).
- Pearson and Spearman with a constant input: 0.0 (scipy returns NaN and warns).

Every function takes ``(predictions, labels)``; all of them are symmetric in the two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import numpy as np

from vqmoe_megatron.glue.tasks import GlueTask, get_task

ArrayLike = Union[Sequence[int], Sequence[float], np.ndarray]


def _pair(predictions: ArrayLike, labels: ArrayLike, minimum: int = 1) -> tuple[np.ndarray, ...]:
    pred, gold = np.asarray(predictions), np.asarray(labels)
    if pred.ndim != 1 or gold.ndim != 1 or len(pred) != len(gold):
        raise ValueError(
            f"predictions and labels must be 1-d and of equal length, got shapes {pred.shape} "
            f"and {gold.shape}"
        )
    if len(pred) < minimum:
        raise ValueError(f"need at least {minimum} predictions, got {len(pred)}")
    return pred, gold


def _class_ids(predictions: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    pred, gold = _pair(predictions, labels)
    for name, values in (("predictions", pred), ("labels", gold)):
        if values.dtype.kind not in "iub" or (values < 0).any():
            raise ValueError(
                f"{name} must be non-negative integer class ids, got dtype {values.dtype}"
            )
    return pred.astype(np.int64), gold.astype(np.int64)


def _values(predictions: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    pred, gold = _pair(predictions, labels, minimum=2)
    pred, gold = pred.astype(np.float64), gold.astype(np.float64)
    if not (np.isfinite(pred).all() and np.isfinite(gold).all()):
        raise ValueError("predictions and labels must be finite numbers")
    return pred, gold


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predictions equal to the label."""
    pred, gold = _class_ids(predictions, labels)
    return float(np.mean(pred == gold))


def f1_score(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Binary F1 of the positive class 1 (MRPC: equivalent, QQP: duplicate)."""
    pred, gold = _class_ids(predictions, labels)
    if pred.max() > 1 or gold.max() > 1:
        raise ValueError("F1 is defined here for binary class ids 0 and 1 only")
    true_pos = int(np.sum((pred == 1) & (gold == 1)))
    wrong = int(np.sum(pred != gold))
    return 0.0 if true_pos == 0 else 2 * true_pos / (2 * true_pos + wrong)


def matthews_corrcoef(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation (multiclass form of Gorodkin 2004; the usual one for two classes)."""
    pred, gold = _class_ids(predictions, labels)
    classes = int(max(pred.max(), gold.max())) + 1
    confusion = np.bincount(gold * classes + pred, minlength=classes * classes)
    confusion = confusion.reshape(classes, classes).astype(np.float64)
    true_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    total, correct = confusion.sum(), np.trace(confusion)
    covariance = correct * total - true_counts @ pred_counts
    variance_pred = total * total - pred_counts @ pred_counts
    variance_true = total * total - true_counts @ true_counts
    if variance_pred == 0 or variance_true == 0:
        return 0.0
    return float(covariance / np.sqrt(variance_pred * variance_true))


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    if (x == x[0]).all() or (y == y[0]).all():
        return 0.0
    x, y = x - x.mean(), y - y.mean()
    r = (x / np.linalg.norm(x)) @ (y / np.linalg.norm(y))
    return float(np.clip(r, -1.0, 1.0))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, tied values sharing the mean of their ranks (scipy's rankdata 'average')."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_group = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.append(starts[1:], len(values))
    ranks = np.empty(len(values))
    ranks[order] = ((starts + 1 + ends) / 2.0)[group]
    return ranks


def pearson(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Pearson correlation; 0.0 when either side is constant."""
    return _correlation(*_values(predictions, labels))


def spearman(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Spearman rank correlation with ties given average ranks; 0.0 when either side is constant."""
    pred, gold = _values(predictions, labels)
    return _correlation(_average_ranks(pred), _average_ranks(gold))


METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "accuracy": accuracy,
    "f1": f1_score,
    "mcc": matthews_corrcoef,
    "pearson": pearson,
    "spearmanr": spearman,
}


def check_predictions(task: Union[str, GlueTask], predictions: ArrayLike) -> np.ndarray:
    """Predictions as an array the task can score: class ids in range, or finite scores.

    Catches the usual slip of passing logits or probabilities where class ids are expected.
    """
    task = get_task(task)
    values = np.asarray(predictions)
    if values.ndim != 1:
        raise ValueError(f"{task.name} predictions must be 1-d, got shape {values.shape}")
    if task.is_regression:
        if values.dtype.kind not in "iuf" or not np.isfinite(values).all():
            raise ValueError(f"{task.name} predictions must be finite scores")
        return values.astype(np.float64)
    if len(values) and (
        values.dtype.kind not in "iu" or values.min() < 0 or values.max() >= task.num_labels
    ):
        raise ValueError(
            f"{task.name} predictions must be class ids 0..{task.num_labels - 1} "
            f"({', '.join(task.labels or ())}), got dtype {values.dtype}: take the argmax of "
            "the logits"
        )
    return values.astype(np.int64)


def compute_task_metrics(
    task: Union[str, GlueTask], predictions: ArrayLike, labels: ArrayLike
) -> dict[str, float]:
    """GLUE's metrics for one dev split of ``task``, plus 'combined' (their mean) when two.

    CoLA: mcc; STS-B: pearson, spearmanr, combined; MRPC and QQP: f1, accuracy, combined;
    the others: accuracy. Score MNLI's dev_matched and dev_mismatched with one call each.
    """
    task = get_task(task)
    predictions = check_predictions(task, predictions)
    results = {name: METRICS[name](predictions, labels) for name in task.metrics}
    if len(results) > 1:
        results["combined"] = float(np.mean(list(results.values())))
    return results
