"""The official GLUE metrics, in float64 numpy (no sklearn / scipy needed).

Conventions for degenerate inputs (chosen so that a trainer comparing a primary metric never sees a
NaN; they match sklearn where sklearn defines a value):
- ``matthews`` is 0.0 when the denominator is 0 (all predictions or all labels in one class).
- ``f1`` (binary, positive class 1) is 0.0 when there is no positive prediction and no positive label.
- ``pearson`` / ``spearman`` are 0.0 when either side is constant (zero variance: no correlation can be
  measured, and a constant predictor carries no information). scipy returns NaN there.
Non-finite predictions are refused with a ValueError rather than scored.

Tasks with several dev splits (MNLI) are scored with :func:`evaluate_splits`, which calls
:func:`compute_metrics` once per split and names the keys with :meth:`TaskSpec.metric_key`
(``accuracy_matched``, ``accuracy_mismatched``).
"""
from __future__ import annotations

from typing import Any, Mapping, Union

import numpy as np
import torch

from abp.train.tasks import TaskSpec, get_task

TaskLike = Union[str, TaskSpec]


def _to_numpy(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # bf16/fp16 have no numpy dtype
        return x.numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise TypeError(f"{what} could not be converted to an array: {e}") from e


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of exact matches between predicted and true class ids."""
    return float(np.mean(pred == labels))


def f1_binary(pred: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class 1: ``2tp / (2tp + fp + fn)``; 0.0 when that denominator is 0."""
    tp = int(np.sum((pred == 1) & (labels == 1)))
    fp = int(np.sum((pred == 1) & (labels != 1)))
    fn = int(np.sum((pred != 1) & (labels == 1)))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2.0 * tp / denom


def matthews_corrcoef(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Matthews correlation (multiclass form of Gorodkin 2004, as sklearn): 0.0 when undefined."""
    t = np.bincount(labels, minlength=num_classes).astype(np.float64)
    p = np.bincount(pred, minlength=num_classes).astype(np.float64)
    c = float(np.sum(pred == labels))
    s = float(len(labels))
    cov_tp = c * s - float(t @ p)
    cov_pp = s * s - float(p @ p)
    cov_tt = s * s - float(t @ t)
    if cov_pp == 0.0 or cov_tt == 0.0:
        return 0.0
    return float(np.clip(cov_tp / np.sqrt(cov_tt * cov_pp), -1.0, 1.0))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation in float64; 0.0 when either side is constant."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    # A constant array's mean can differ from its value by an ulp, so test constancy exactly.
    if x.max() == x.min() or y.max() == y.min():
        return 0.0
    xm = x - x.mean()
    ym = y - y.mean()
    denom = np.sqrt(np.sum(xm * xm) * np.sum(ym * ym))
    if denom == 0.0:  # underflow of tiny spreads
        return 0.0
    return float(np.clip(np.sum(xm * ym) / denom, -1.0, 1.0))


def rankdata_average(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the average of the ranks they span (scipy's ``method='average'``)."""
    x = np.asarray(x)
    n = x.shape[0]
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_group = np.empty(n, dtype=bool)
    new_group[:1] = True
    new_group[1:] = xs[1:] != xs[:-1]
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)  # exclusive
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = avg[group]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation: Pearson of average ranks; 0.0 when either side is constant."""
    return pearson(rankdata_average(x), rankdata_average(y))


def _class_predictions(task: TaskSpec, predictions: np.ndarray) -> np.ndarray:
    if predictions.ndim == 2:
        if predictions.shape[1] != task.num_labels:
            raise ValueError(
                f"task {task.name}: logits have {predictions.shape[1]} columns, expected num_labels={task.num_labels}"
            )
        if not np.issubdtype(predictions.dtype, np.number) or not np.all(np.isfinite(predictions)):
            raise ValueError(f"task {task.name}: logits contain NaN/inf (or are not numeric)")
        return predictions.argmax(axis=1)
    if predictions.ndim == 1 and np.issubdtype(predictions.dtype, np.integer):
        if predictions.size and (predictions.min() < 0 or predictions.max() >= task.num_labels):
            raise ValueError(f"task {task.name}: predicted class ids must lie in [0, {task.num_labels})")
        return predictions
    raise ValueError(
        f"task {task.name}: predictions must be logits [n, {task.num_labels}] or integer class ids [n], "
        f"got shape {tuple(predictions.shape)} dtype {predictions.dtype}"
    )


def compute_metrics(task: TaskLike, predictions: Any, labels: Any) -> dict[str, float]:
    """The task's metrics on one split, keyed by bare metric name (``accuracy``, ``f1``, ``matthews``,
    ``pearson``, ``spearman``).

    ``predictions``: classification logits ``[n, num_labels]`` (or integer class ids ``[n]``);
    regression outputs ``[n]`` or ``[n, 1]``. ``labels``: ``[n]`` integer class ids / float scores.
    Tensors (any device/dtype), numpy arrays and lists are accepted.
    """
    task = get_task(task)
    pred = _to_numpy(predictions, "predictions")
    lab = _to_numpy(labels, "labels")
    if lab.ndim != 1:
        raise ValueError(f"task {task.name}: labels must be 1-D, got shape {tuple(lab.shape)}")
    n = lab.shape[0]
    if n == 0:
        raise ValueError(f"task {task.name}: no examples to score")
    if pred.shape[0] != n:
        raise ValueError(f"task {task.name}: {pred.shape[0]} predictions for {n} labels")

    if task.is_regression:
        if pred.ndim == 2 and pred.shape[1] == 1:
            pred = pred[:, 0]
        if pred.ndim != 1:
            raise ValueError(f"task {task.name}: regression outputs must be [n] or [n, 1], got {tuple(pred.shape)}")
        pred = pred.astype(np.float64)
        lab = lab.astype(np.float64)
        if not np.all(np.isfinite(pred)):
            raise ValueError(f"task {task.name}: predictions contain NaN/inf")
        if not np.all(np.isfinite(lab)):
            raise ValueError(f"task {task.name}: labels contain NaN/inf")
        funcs = {"pearson": pearson, "spearman": spearman}
        return {m: funcs[m](pred, lab) for m in task.metrics}

    if not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"task {task.name}: classification labels must be integer class ids, got dtype {lab.dtype}")
    if lab.min() < 0 or lab.max() >= task.num_labels:
        raise ValueError(f"task {task.name}: labels must lie in [0, {task.num_labels}), got [{lab.min()}, {lab.max()}]")
    cls = _class_predictions(task, pred).astype(np.int64)
    lab = lab.astype(np.int64)
    out: dict[str, float] = {}
    for m in task.metrics:
        if m == "accuracy":
            out[m] = accuracy(cls, lab)
        elif m == "f1":
            if task.num_labels != 2:
                raise ValueError(f"task {task.name}: binary f1 needs 2 classes, has {task.num_labels}")
            out[m] = f1_binary(cls, lab)
        elif m == "matthews":
            out[m] = matthews_corrcoef(cls, lab, task.num_labels)
        else:
            raise ValueError(f"task {task.name}: metric {m!r} is not implemented for classification")
    return out


def evaluate_splits(task: TaskLike, outputs: Mapping[str, tuple[Any, Any]]) -> dict[str, float]:
    """Metrics over several dev splits at once: ``outputs`` maps a dev split name (``dev`` is the
    primary one) to ``(predictions, labels)``; keys come from :meth:`TaskSpec.metric_key`, so MNLI gives
    ``accuracy_matched`` / ``accuracy_mismatched`` and single-split tasks their bare names."""
    task = get_task(task)
    if not outputs:
        raise ValueError(f"task {task.name}: no split outputs to evaluate")
    result: dict[str, float] = {}
    seen: set[str] = set()
    for split, (predictions, labels) in outputs.items():
        canon = task.canonical_split(split)
        if canon == "train":
            raise ValueError(f"task {task.name}: evaluate_splits scores dev splits, not 'train'")
        if canon in seen:
            raise ValueError(f"task {task.name}: split {canon!r} given twice")
        seen.add(canon)
        for m, v in compute_metrics(task, predictions, labels).items():
            result[task.metric_key(m, canon)] = v
    return result


def primary_metric(task: TaskLike) -> str:
    """The key a trainer selects on (higher is better): e.g. ``accuracy`` for SST-2, ``pearson`` for
    STS-B, ``matthews`` for CoLA, ``f1`` for MRPC/QQP, ``accuracy_matched`` for MNLI."""
    return get_task(task).primary_metric


def custom_metrics(preds: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    """Custom datasets: accuracy for classification, Pearson/Spearman for regression."""
    if num_labels == 1:
        p, y = preds.reshape(-1).double().numpy(), labels.double().numpy()
        return {"pearson": pearson(p, y), "spearman": spearman(p, y)}
    return {"accuracy": accuracy(preds.argmax(-1).numpy(), labels.numpy())}
