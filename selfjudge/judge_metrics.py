"""Judge metrics in numpy: ROC-AUC, PR-AUC, precision/recall and the operating points saved with a head."""

from __future__ import annotations

import numpy as np


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie-averaged ranks)."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ps = np.asarray(p)[order]
    ranks = np.empty(len(p), dtype=np.float64)
    i = 0
    while i < len(ps):  # average ranks over ties
        j = i
        while j + 1 < len(ps) and ps[j + 1] == ps[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds (descending, distinct) with true/false positive counts of 'p >= threshold'."""
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order].astype(np.float64)
    last = np.r_[np.nonzero(np.diff(ps))[0], len(ps) - 1]
    tp = np.cumsum(ys)[last]
    fp = (last + 1) - tp
    return ps[last], tp, fp, np.full_like(tp, ys.sum())


def pr_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision (step-wise area under the precision-recall curve)."""
    y, p = np.asarray(y).astype(bool), np.asarray(p, dtype=np.float64)
    if y.sum() == 0:
        return float("nan")
    _, tp, fp, pos = _curve(y, p)
    precision, recall = tp / (tp + fp), tp / pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def precision_recall_at(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    pred = np.asarray(p) >= threshold
    y = np.asarray(y).astype(bool)
    tp = float((pred & y).sum())
    return (tp / pred.sum() if pred.sum() else float("nan")), (tp / y.sum() if y.sum() else float("nan"))


def operating_points(y: np.ndarray, p: np.ndarray, quantiles: list[float]) -> dict:
    """Youden's J cut, the cut with the best precision at recall >= 0.8, and probability quantiles.

    Cuts are on P(important): the eval judge accepts a mismatch when P(important) < cut.
    """
    y, p = np.asarray(y).astype(bool), np.asarray(p, dtype=np.float64)
    th, tp, fp, pos = _curve(y, p)
    neg = len(y) - pos[0] if len(pos) else 0
    tpr, fpr = tp / max(pos[0], 1), fp / max(neg, 1)
    j = int(np.argmax(tpr - fpr)) if len(th) else 0
    prec = tp / (tp + fp)
    ok = np.nonzero(tpr >= 0.8)[0]
    k = int(ok[np.argmax(prec[ok])]) if len(ok) else 0
    return {
        "youden": float(th[j]) if len(th) else 0.5,
        "precision_at_recall_0.8": float(th[k]) if len(th) else 0.5,
        "quantiles": [float(np.quantile(p, q)) for q in quantiles] if len(p) else [],
        "quantile_levels": list(quantiles),
    }


def summarize(y: np.ndarray, p: np.ndarray, loss: float, threshold: float = 0.5) -> dict:
    prec, rec = precision_recall_at(y, p, threshold)
    return {"loss": loss, "roc_auc": roc_auc(y, p), "pr_auc": pr_auc(y, p), "positive_rate": float(np.mean(y)),
            "precision@0.5": prec, "recall@0.5": rec, "n": int(len(y))}
