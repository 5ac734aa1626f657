"""Judge metrics in numpy: ROC-AUC, PR-AUC, precision/recall, the harm a rule lets through at each acceptance
share, and the operating points saved with a head.

Convention: a row is *predicted important* (the draft token is rejected) when ``p >= cut``; eval accepts
a mismatch when ``P(important) < cut``. Every cut below is a value of ``p`` seen on validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def quantile(x: Any, q: float) -> float:
    """The ``q`` quantile of ``x`` (a tensor or array; linear interpolation, as ``torch.quantile``), in float64
    with numpy: no input-size limit (``torch.quantile`` refuses 2^24 elements or more)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError("quantile of an empty set")
    return float(np.quantile(a, q))


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y).astype(bool).ravel(), np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.shape[0]}) and scores ({p.shape[0]}) differ in length")
    if np.isnan(p).any():
        raise ValueError("scores contain NaN (a diverged head? lower train.lr)")
    return y, p


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney U statistic with tie-averaged ranks (NaN with one class)."""
    y, p = _check(y, p)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inv, counts = np.unique(p, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    avg_rank = ends - (counts - 1) / 2.0  # mean rank inside each tie group
    ranks = avg_rank[inv]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct cuts (descending) with the true and false positive counts of ``p >= cut``."""
    y, p = _check(y, p)
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order].astype(np.float64)
    last = np.r_[np.nonzero(np.diff(ps))[0], len(ps) - 1] if len(ps) else np.zeros(0, dtype=int)
    tp = np.cumsum(ys)[last]
    fp = (last + 1) - tp
    return ps[last], tp, fp


def pr_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision: sum over cuts of (recall step) * precision (NaN without positives)."""
    y, p = _check(y, p)
    if y.sum() == 0:
        return float("nan")
    _, tp, fp = curve(y, p)
    precision, recall = tp / (tp + fp), tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def accepted_harm(y: np.ndarray, p: np.ndarray, shares: Sequence[float]) -> np.ndarray:
    """For each share ``s``: the positive rate among the ``round(s * n)`` rows with the lowest ``p`` (what a
    rule accepting the rows it scores safest lets through). Rows tied at the cut count at their tie group's
    positive rate, the expectation over any order within ties. NaN where no row is accepted."""
    y, p = _check(y, p)
    order = np.argsort(p, kind="mergesort")
    ps, ys = p[order], y[order].astype(np.float64)
    _, first, counts = np.unique(ps, return_index=True, return_counts=True)
    rate = np.repeat(np.add.reduceat(ys, first) / counts, counts) if len(ps) else ys
    cum = np.r_[0.0, np.cumsum(rate)]
    k = np.rint(np.asarray(shares, dtype=np.float64) * len(ps)).astype(int).clip(0, len(ps))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k > 0, cum[k] / np.maximum(k, 1), np.nan)


def precision_recall_at(y: np.ndarray, p: np.ndarray, cut: float) -> tuple[float, float]:
    """Precision and recall of 'important' when predicting ``p >= cut`` (NaN when undefined)."""
    y, p = _check(y, p)
    pred = p >= cut
    tp = float((pred & y).sum())
    prec = tp / pred.sum() if pred.sum() else float("nan")
    rec = tp / y.sum() if y.sum() else float("nan")
    return float(prec), float(rec)


def operating_points(y: np.ndarray, p: np.ndarray, quantiles: Sequence[float], min_recall: float = 0.8) -> dict:
    """The cuts stored in a head's ``thresholds``.

    ``youden``: the cut maximising TPR - FPR. ``precision_at_recall_0.8``: the cut with the best precision
    among those with recall >= 0.8 (the highest such cut on ties). ``quantiles``: validation-probability
    quantiles at ``quantile_levels`` (the eval sweep).
    """
    y, p = _check(y, p)
    if len(p) == 0 or y.all() or not y.any():
        raise ValueError("operating points need validation rows of both classes (raise train.val_fraction)")
    th, tp, fp = curve(y, p)
    tpr, fpr = tp / y.sum(), fp / (~y).sum()
    j = int(np.argmax(tpr - fpr))
    prec = tp / (tp + fp)
    ok = np.nonzero(tpr >= min_recall)[0]  # never empty: the lowest cut has recall 1
    k = int(ok[np.argmax(prec[ok])])
    return {
        "youden": float(th[j]),
        f"precision_at_recall_{min_recall:g}": float(th[k]),
        "quantiles": [float(np.quantile(p, q)) for q in quantiles],
        "quantile_levels": [float(q) for q in quantiles],
    }


def summarize(y: np.ndarray, p: np.ndarray, loss: float, cut: float = 0.5) -> dict:
    """Loss, ROC-AUC, PR-AUC, positive rate and precision/recall at ``cut`` over one split."""
    y, p = _check(y, p)
    prec, rec = precision_recall_at(y, p, cut)
    return {
        "loss": float(loss),
        "roc_auc": roc_auc(y, p),
        "pr_auc": pr_auc(y, p),
        "positive_rate": float(np.mean(y)),
        "cut": float(cut),
        "precision": prec,
        "recall": rec,
        "n": int(len(y)),
    }


def bce_loss(y: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy from logits (numerically stable)."""
    y, z = np.asarray(y, dtype=np.float64), np.asarray(logits, dtype=np.float64)
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))
