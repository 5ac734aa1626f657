"""Judge metrics: hand-computed values and scikit-learn as the oracle (sklearn only here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfjudge.judge_metrics import (
    accepted_harm,
    bce_loss,
    curve,
    operating_points,
    pr_auc,
    precision_recall_at,
    roc_auc,
    summarize,
)


def test_hand_computed_example():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    assert roc_auc(y, p) == 0.75  # 3 of 4 (pos, neg) pairs ordered
    assert pr_auc(y, p) == pytest.approx((1 / 1) * 0.5 + (2 / 3) * 0.5)  # AP = sum of recall steps x precision
    assert precision_recall_at(y, p, 0.35) == (2 / 3, 1.0)
    assert precision_recall_at(y, p, 0.9)[1] == 0.0 and np.isnan(precision_recall_at(y, p, 0.9)[0])
    th, tp, fp = curve(y, p)
    assert th.tolist() == [0.8, 0.4, 0.35, 0.1] and tp.tolist() == [1, 1, 2, 2] and fp.tolist() == [0, 1, 1, 2]


def test_ties_are_averaged():
    y = np.array([0, 1, 0, 1])
    p = np.array([0.5, 0.5, 0.5, 0.5])
    assert roc_auc(y, p) == 0.5


def test_accepted_harm_by_hand_and_by_brute_force():
    y = np.array([0, 1, 0, 1, 0])
    p = np.array([0.1, 0.2, 0.2, 0.9, np.inf])  # the safest first; a tie at 0.2 counts at its rate 1/2
    h = accepted_harm(y, p, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert np.isnan(h[0])
    assert h[1:].tolist() == pytest.approx([0.0, 0.5 / 2, 1 / 3, 2 / 4, 2 / 5])
    # without ties: the positive rate among the k lowest scores, counted directly
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 200), rng.random(200)
    shares = np.linspace(0.05, 1.0, 20)
    want = [y[np.argsort(p)[: round(s * 200)]].mean() for s in shares]
    assert accepted_harm(y, p, shares) == pytest.approx(want)
    # ties: the mean over every order within them (here all tied: the base rate at every share)
    assert accepted_harm(y, np.zeros(200), shares) == pytest.approx(np.full(20, y.mean()))


def test_metrics_match_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    for n in (7, 500, 5000):
        y = rng.integers(0, 2, n)
        p = np.round(rng.random(n) * 0.5 + y * 0.3, 2)  # many ties
        assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert pr_auc(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)


def test_operating_points_against_brute_force():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = 1 / (1 + np.exp(-(rng.normal(size=400) + 1.2 * y)))
    ops = operating_points(y, p, [0.05, 0.5, 0.95])
    fpr, tpr, th = roc_curve(y, p)
    assert ops["youden"] == pytest.approx(th[np.argmax(tpr - fpr)])
    best = max(
        (c for c in np.unique(p) if precision_recall_at(y, p, c)[1] >= 0.8),
        key=lambda c: (precision_recall_at(y, p, c)[0], c),
    )
    assert ops["precision_at_recall_0.8"] == best
    assert ops["quantiles"] == [float(np.quantile(p, q)) for q in (0.05, 0.5, 0.95)]
    assert ops["quantile_levels"] == [0.05, 0.5, 0.95]


def test_one_class_is_nan_or_an_error():
    y, p = np.zeros(5), np.linspace(0, 1, 5)
    assert np.isnan(roc_auc(y, p)) and np.isnan(pr_auc(y, p))
    with pytest.raises(ValueError, match="val_fraction"):
        operating_points(y, p, [0.5])
    with pytest.raises(ValueError, match="differ in length"):
        roc_auc(np.zeros(3), np.zeros(4))


def test_bce_and_summary():
    rng = np.random.default_rng(2)
    z, y = rng.normal(size=100) * 20, rng.integers(0, 2, 100)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(z), torch.tensor(y, dtype=torch.float64))
    assert bce_loss(y, z) == pytest.approx(float(ref), rel=1e-12)
    s = summarize(y, 1 / (1 + np.exp(-z)), 0.3)
    assert s["n"] == 100 and s["positive_rate"] == pytest.approx(y.mean()) and s["loss"] == 0.3
