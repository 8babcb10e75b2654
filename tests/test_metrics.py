"""GLUE metrics against scipy and hand-computed formulas, incl. ties and degenerate inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from abp.train import metrics as M
from abp.train.tasks import TASKS, get_task


def _rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- independent oracles


def _mcc_binary(pred, lab):
    tp = np.sum((pred == 1) & (lab == 1)); tn = np.sum((pred == 0) & (lab == 0))
    fp = np.sum((pred == 1) & (lab == 0)); fn = np.sum((pred == 0) & (lab == 1))
    den = math.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return 0.0 if den == 0 else float(tp * tn - fp * fn) / den


def _mcc_gorodkin(pred, lab, k):
    """Gorodkin's confusion-matrix form: a different formula from the implementation's covariance one."""
    C = np.zeros((k, k))
    for p, t in zip(pred, lab):
        C[t, p] += 1  # rows true, columns predicted
    num = sum(C[a, a] * C[b, c] - C[a, b] * C[c, a] for a in range(k) for b in range(k) for c in range(k))
    d1 = sum(C[a, :].sum() * sum(C[b, :].sum() for b in range(k) if b != a) for a in range(k))
    d2 = sum(C[:, a].sum() * sum(C[:, b].sum() for b in range(k) if b != a) for a in range(k))
    return 0.0 if d1 * d2 == 0 else num / math.sqrt(d1 * d2)


def _pearson64(x, y):
    x = np.asarray(x, np.float64); y = np.asarray(y, np.float64)
    n = len(x)
    sx, sy = x.sum(), y.sum()
    return (n * (x * y).sum() - sx * sy) / math.sqrt((n * (x * x).sum() - sx**2) * (n * (y * y).sum() - sy**2))


def _ranks_bruteforce(x):
    x = list(x)
    return np.array([sum(v < xi for v in x) + (sum(v == xi for v in x) + 1) / 2 for xi in x])


# ----------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("n", [1, 7, 59, 1000])
def test_accuracy_f1_matthews_binary(n):
    rng = _rng(n)
    pred = rng.integers(0, 2, n); lab = rng.integers(0, 2, n)
    assert M.accuracy(pred, lab) == pytest.approx(np.mean(pred == lab), abs=0)
    tp = np.sum((pred == 1) & (lab == 1)); fp = np.sum((pred == 1) & (lab == 0)); fn = np.sum((pred == 0) & (lab == 1))
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    assert M.f1_binary(pred, lab) == pytest.approx(f1, abs=1e-12)
    assert M.matthews_corrcoef(pred, lab, 2) == pytest.approx(_mcc_binary(pred, lab), abs=1e-12)


@pytest.mark.parametrize("k,n", [(3, 97), (4, 500)])
def test_matthews_multiclass_vs_gorodkin(k, n):
    rng = _rng(k * n)
    lab = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < 0.6, lab, rng.integers(0, k, n))
    assert M.matthews_corrcoef(pred, lab, k) == pytest.approx(_mcc_gorodkin(pred, lab, k), abs=1e-12)


def test_matthews_hand_values():
    lab = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    pred = np.array([1, 0, 1, 0, 0, 1, 0, 1])
    # tp=3 tn=3 fp=1 fn=1 -> (9-1)/sqrt(4*4*4*4) = 0.5
    assert M.matthews_corrcoef(pred, lab, 2) == pytest.approx(0.5, abs=1e-15)
    assert M.matthews_corrcoef(lab, lab, 2) == 1.0
    assert M.matthews_corrcoef(1 - lab, lab, 2) == -1.0


def test_degenerate_classification():
    lab = np.array([0, 1, 1, 0, 1])
    const = np.ones(5, dtype=np.int64)
    assert M.matthews_corrcoef(const, lab, 2) == 0.0  # constant predictions
    assert M.matthews_corrcoef(lab, np.zeros(5, np.int64), 2) == 0.0  # constant labels
    assert M.f1_binary(np.zeros(5, np.int64), np.zeros(5, np.int64)) == 0.0  # no positives anywhere
    assert M.f1_binary(np.zeros(5, np.int64), lab) == 0.0
    assert M.f1_binary(lab, lab) == 1.0


def test_pearson_spearman_vs_scipy():
    from scipy import stats  # the test extra installs scipy
    rng = _rng(3)
    for n in (3, 17, 500):
        x = rng.normal(size=n); y = 0.5 * x + rng.normal(size=n)
        assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
        assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
        # heavy ties: STS-B-like scores on a 0..5 grid of halves
        xt = rng.integers(0, 11, n) / 2.0; yt = np.clip(xt + rng.integers(-2, 3, n) / 2.0, 0, 5)
        if np.ptp(xt) and np.ptp(yt):
            assert M.spearman(xt, yt) == pytest.approx(stats.spearmanr(xt, yt)[0], abs=1e-12)
            assert M.pearson(xt, yt) == pytest.approx(stats.pearsonr(xt, yt)[0], abs=1e-12)
        assert np.array_equal(M.rankdata_average(xt), stats.rankdata(xt, method="average"))


def test_pearson_spearman_hand():
    rng = _rng(4)
    x = rng.normal(size=60); y = x**3 + rng.normal(size=60)
    assert M.pearson(x, y) == pytest.approx(_pearson64(x, y), abs=1e-12)
    t = rng.integers(0, 4, 40)
    assert np.array_equal(M.rankdata_average(t), _ranks_bruteforce(t))
    # monotone but non-linear: spearman exactly 1, pearson below 1
    z = np.exp(x)
    assert M.spearman(x, z) == pytest.approx(1.0, abs=1e-15)
    assert M.pearson(x, z) < 0.99
    assert M.spearman(x, -z) == pytest.approx(-1.0, abs=1e-15)


def test_correlation_degenerate_is_zero():
    x = np.full(7, 0.1)  # mean of 0.1 * 7 is not exactly 0.1 in float64: must still count as constant
    y = _rng(8).normal(size=7) ** 3  # without the constancy test this gives ~1e-17 instead of 0
    assert M.pearson(x, y) == 0.0 and M.spearman(x, y) == 0.0
    assert M.pearson(y, x) == 0.0 and M.spearman(y, x) == 0.0
    assert M.pearson(np.array([2.0]), np.array([3.0])) == 0.0


# ------------------------------------------------------------------------------ compute_metrics


def test_compute_metrics_keys_and_primary():
    rng = _rng(5)
    for spec in TASKS.values():
        n = 31
        if spec.is_regression:
            pred, lab = rng.normal(size=n), rng.uniform(0, 5, n)
        else:
            pred, lab = rng.normal(size=(n, spec.num_labels)), rng.integers(0, spec.num_labels, n)
        out = M.compute_metrics(spec.name, pred, lab)
        assert tuple(out) == spec.metrics
        assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
        assert M.primary_metric(spec.name) == spec.primary_metric
        full = M.evaluate_splits(spec, {s: (pred, lab) for s in spec.dev_splits})
        assert tuple(full) == spec.metric_keys() and spec.primary_metric in full
    assert M.primary_metric("SST-2") == "accuracy"
    assert M.primary_metric("sts-b") == "pearson"
    assert M.primary_metric("CoLA") == "matthews"
    assert M.primary_metric("MRPC") == "f1" and M.primary_metric("qqp") == "f1"
    assert M.primary_metric("MNLI") == "accuracy_matched"


def test_compute_metrics_values_torch_inputs():
    rng = _rng(6)
    n = 203
    logits = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    lab = torch.from_numpy(rng.integers(0, 2, n))
    pred = logits.argmax(1).numpy()
    out = M.compute_metrics("mrpc", logits, lab)
    assert out["accuracy"] == pytest.approx(np.mean(pred == lab.numpy()), abs=1e-15)
    assert out["f1"] == pytest.approx(M.f1_binary(pred, lab.numpy()), abs=1e-15)
    out = M.compute_metrics("cola", logits.to(torch.bfloat16), lab)  # bf16 has no numpy dtype
    assert out["matthews"] == pytest.approx(_mcc_binary(logits.to(torch.bfloat16).float().argmax(1).numpy(), lab.numpy()), abs=1e-12)
    # class ids instead of logits
    assert M.compute_metrics("sst2", torch.from_numpy(pred), lab)["accuracy"] == pytest.approx(np.mean(pred == lab.numpy()))
    # MNLI 3-way argmax (a 0/1 threshold would get this wrong)
    l3 = torch.tensor([[0.1, 0.2, 0.9], [2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    assert M.compute_metrics("mnli", l3, torch.tensor([2, 0, 1]))["accuracy"] == 1.0
    assert M.compute_metrics("mnli", l3, torch.tensor([0, 0, 0]))["accuracy"] == pytest.approx(1 / 3)


def test_compute_metrics_regression_shapes():
    from scipy import stats  # the test extra installs scipy
    rng = _rng(7)
    y = rng.uniform(0, 5, 100); p = y + rng.normal(size=100)
    ref = {"pearson": stats.pearsonr(p, y)[0], "spearman": stats.spearmanr(p, y)[0]}
    for pp in (p, p[:, None], torch.from_numpy(p).float(), torch.from_numpy(p).float()[:, None]):
        out = M.compute_metrics("stsb", pp, torch.from_numpy(y))
        tol = 1e-12 if isinstance(pp, np.ndarray) else 1e-6
        assert out["pearson"] == pytest.approx(ref["pearson"], abs=tol)
        assert out["spearman"] == pytest.approx(ref["spearman"], abs=tol)
    assert M.compute_metrics("stsb", np.full(100, 2.5), y) == {"pearson": 0.0, "spearman": 0.0}


def test_compute_metrics_errors():
    with pytest.raises(ValueError, match="columns, expected num_labels=2"):
        M.compute_metrics("sst2", np.zeros((4, 3)), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="NaN"):
        M.compute_metrics("sst2", np.array([[0.0, np.nan]]), np.array([0]))
    with pytest.raises(ValueError, match="NaN"):
        M.compute_metrics("stsb", np.array([np.inf, 1.0]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        M.compute_metrics("sst2", np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(TypeError, match="integer class ids"):
        M.compute_metrics("sst2", np.zeros((2, 2)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        M.compute_metrics("sst2", np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="no examples"):
        M.compute_metrics("sst2", np.zeros((0, 2)), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match=r"regression outputs must be \[n\] or \[n, 1\]"):
        M.compute_metrics("stsb", np.zeros((2, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="logits"):
        M.compute_metrics("sst2", np.zeros(2), np.zeros(2, np.int64))  # float 1-D is not class ids
    with pytest.raises(ValueError, match="unknown GLUE task"):
        M.compute_metrics("imdb", np.zeros((2, 2)), np.zeros(2, np.int64))


def test_evaluate_splits_mnli():
    spec = get_task("mnli")
    lab = np.array([0, 1, 2, 0])
    good = np.eye(3)[lab]
    bad = np.eye(3)[(lab + 1) % 3]
    out = M.evaluate_splits("mnli", {"dev_matched": (good, lab), "dev_mismatched": (bad, lab)})
    assert out == {"accuracy_matched": 1.0, "accuracy_mismatched": 0.0}
    assert M.evaluate_splits(spec, {"dev": (good, lab)}) == {"accuracy_matched": 1.0}
    assert M.evaluate_splits("sst2", {"dev": (np.eye(2)[[0, 1]], np.array([0, 1]))}) == {"accuracy": 1.0}
    with pytest.raises(ValueError, match="given twice"):
        M.evaluate_splits(spec, {"dev": (good, lab), "dev_matched": (good, lab)})
    with pytest.raises(ValueError, match="no split"):
        M.evaluate_splits(spec, {"dev_x": (good, lab)})
    with pytest.raises(ValueError, match="not 'train'"):
        M.evaluate_splits(spec, {"train": (good, lab)})
