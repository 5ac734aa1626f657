"""Decode metrics, each defined once here. Inputs are per-example records of one (method, threshold)."""

from __future__ import annotations

from typing import Any, Iterable


def aggregate(records: Iterable[dict[str, Any]], baseline_tokens_per_s: float | None = None) -> dict[str, Any]:
    recs = list(records)
    new = sum(r["new_tokens"] for r in recs)
    fwd = sum(r["target_forwards"] for r in recs)
    prop = sum(r["proposed"] for r in recs)
    acc = sum(r["accepted"] for r in recs)
    secs = sum(r["seconds"] for r in recs)
    scores = [r["score"] for r in recs if r.get("score") is not None]
    hist: list[int] = []
    for r in recs:
        h = r.get("accept_hist") or []
        hist = [a + b for a, b in zip(hist + [0] * (len(h) - len(hist)), h + [0] * (len(hist) - len(h)))]
    tps = new / secs if secs > 0 else 0.0
    return {
        "examples": len(recs),
        # accuracy: mean task score (exact match / pass@1 / agreement with target greedy when no checker)
        "accuracy": sum(scores) / len(scores) if scores else None,
        # mean accepted length: new tokens per target forward, the correction/bonus token included
        "mean_accepted_length": new / fwd if fwd else 0.0,
        # acceptance rate: share of proposed draft tokens that were kept
        "acceptance_rate": acc / prop if prop else None,
        # tokens/s: generated tokens over wall time (prefill included, warm-up excluded)
        "tokens_per_s": tps,
        # speedup: tokens/s over target-only tokens/s, same prompts, same process
        "speedup": tps / baseline_tokens_per_s if baseline_tokens_per_s else None,
        "new_tokens": new,
        "target_forwards": fwd,
        "seconds": secs,
        "accept_hist": hist,  # index n: rounds that kept n draft tokens
    }


def agreement(output: list[int], reference: list[int]) -> float:
    """Quality without a gold answer: share of the target's greedy answer reproduced as a common prefix."""
    n = 0
    for a, b in zip(output, reference):
        if a != b:
            break
        n += 1
    return n / max(1, len(reference))
