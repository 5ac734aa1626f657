"""Decode metrics, each defined once, here. Inputs are the per-example records of one (method, threshold)
as the eval stage writes them to per_example.jsonl."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def prefix_agreement(output: Sequence[int], reference: Sequence[int]) -> float:
    """Share of the reference (the target's own answer) reproduced as a common prefix, in [0, 1]."""
    n = 0
    for a, b in zip(output, reference):
        if a != b:
            break
        n += 1
    return n / len(reference) if reference else float(len(output) == 0)


def add_hist(total: list[int], h: Sequence[int]) -> list[int]:
    """Element-wise sum of two histograms of possibly different lengths."""
    out = list(total) + [0] * max(0, len(h) - len(total))
    for i, x in enumerate(h):
        out[i] += x
    return out


def aggregate(records: Iterable[dict[str, Any]], baseline_tokens_per_s: float | None = None) -> dict[str, Any]:
    """Metrics of one method over its examples (sums over examples, then ratios)."""
    recs = list(records)
    new = sum(r["new_tokens"] for r in recs)
    rounds = sum(r["rounds"] for r in recs)
    prop = sum(r["proposed"] for r in recs)
    acc = sum(r["accepted"] for r in recs)
    secs = sum(r["seconds"] for r in recs)
    scores = [r["score"] for r in recs if r["score"] is not None]
    exact = [r["agree_exact"] for r in recs if r.get("agree_exact") is not None]
    prefix = [r["agree_prefix"] for r in recs if r.get("agree_prefix") is not None]
    hist: list[int] = []
    for r in recs:
        hist = add_hist(hist, r["accept_hist"])
    tps = new / secs if secs > 0 else 0.0
    timed = [r for r in recs if "rule_seconds" in r]  # records written before the rule was timed lack it
    verify = sum(r["verify_seconds"] for r in timed)
    rule = sum(r["rule_seconds"] for r in timed)
    timed_rounds = sum(r["rounds"] for r in timed)
    return {
        "examples": len(recs),
        # accuracy: mean task score (number/letter match, pass@1); for examples without a checker, the
        # prefix agreement with the target-only output of the same eval
        "accuracy": sum(scores) / len(scores) if scores else None,
        # agreement_exact: share of outputs token-identical to the target-only output (same prompt, same run)
        "agreement_exact": sum(exact) / len(exact) if exact else None,
        # agreement_prefix: mean share of the target-only output reproduced as a common prefix
        "agreement_prefix": sum(prefix) / len(prefix) if prefix else None,
        # mean accepted length: new tokens per target forward (kept draft tokens + the correction/bonus)
        "mean_accepted_length": new / rounds if rounds else 0.0,
        # acceptance rate: share of proposed draft tokens kept (standard test or rule)
        "acceptance_rate": acc / prop if prop else None,
        # tokens/s: generated tokens over decode wall time (prefill included, warm-up excluded)
        "tokens_per_s": tps,
        # speedup: tokens/s over the target-only tokens/s of the same prompts in the same process
        "speedup": tps / baseline_tokens_per_s if baseline_tokens_per_s else None,
        "new_tokens": new,  # generated tokens, all examples
        "target_forwards": rounds,  # target forwards, all examples (one per round; the prompt read in round 1)
        "draft_forwards": sum(r["draft_forwards"] for r in recs),
        "proposed": prop,  # draft tokens proposed
        "accepted": acc,  # draft tokens kept
        "accepted_by_rule": sum(r["accepted_by_rule"] for r in recs),  # kept only thanks to the rule
        "seconds": secs,  # decode wall time, all examples
        # rule cost: the acceptance rule's time (judge head: one small matmul per round) as a share of the
        # verify phase it is part of (exact on CUDA with eval.profile=true)
        "rule_share_of_verify": rule / verify if verify > 0 else None,
        "rule_ms_per_round": 1e3 * rule / timed_rounds if timed_rounds else None,
        "accept_hist": hist,  # index n: speculative rounds that kept n draft tokens
    }


def paired_with(records: Iterable[dict[str, Any]], reference: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """A method against a reference method (lossless SD) on the prompts both decoded: the mean accuracy
    difference with its paired standard error (the methods share most answers, so this separates much
    smaller differences than the two accuracies' own errors) and the ratio of mean accepted lengths."""
    ref = {r["prompt_id"]: r for r in reference}
    recs = [r for r in records if r["prompt_id"] in ref]
    diffs = [
        r["score"] - ref[r["prompt_id"]]["score"]
        for r in recs
        if r["score"] is not None and ref[r["prompt_id"]]["score"] is not None
    ]
    n = len(diffs)
    mean = sum(diffs) / n if n else None
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None
    mine, theirs = (aggregate(rs)["mean_accepted_length"] for rs in (recs, [ref[r["prompt_id"]] for r in recs]))
    return {
        # accuracy_vs_lossless: mean over shared prompts of (score - lossless score); _se its standard error
        "accuracy_vs_lossless": mean,
        "accuracy_vs_lossless_se": se,
        # accepted_length_vs_lossless: mean accepted length over lossless SD's, same prompts
        "accepted_length_vs_lossless": mine / theirs if recs and theirs else None,
    }


def unique_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (method, threshold, prompt id), the first one: a later copy (two writers in one
    folder) is dropped, never counted twice."""
    seen, out = set(), []
    for r in records:
        key = (r["method"], r["threshold"], r["prompt_id"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def summary_rows(records: list[dict[str, Any]], keys: Sequence[tuple[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, threshold): :func:`aggregate` with speedup against the target-only records,
    plus :func:`paired_with` the lossless records (when the run has them). Duplicates are dropped."""
    records = unique_records(records)
    base = aggregate(r for r in records if r["method"] == "target")
    lossless = [r for r in records if r["method"] == "lossless"]
    rows = []
    for m, t in keys:
        mine = [r for r in records if r["method"] == m and r["threshold"] == t]
        rows.append(
            {
                "method": m,
                "threshold": t,
                **aggregate(mine, base["tokens_per_s"]),
                **(paired_with(mine, lossless) if lossless else {}),
            }
        )
    return rows


def finished_by_all(records: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str], int]:
    """(records of the prompts that every (method, threshold) seen has finished, those prompt ids, prompts
    started): a running or stopped eval's file read as far as it is comparable."""
    recs = unique_records(records)
    keys = {(r["method"], r["threshold"]) for r in recs}
    by_prompt: dict[str, set] = {}
    for r in recs:
        by_prompt.setdefault(r["prompt_id"], set()).add((r["method"], r["threshold"]))
    done = sorted(p for p, ks in by_prompt.items() if ks == keys)
    keep = set(done)
    return [r for r in recs if r["prompt_id"] in keep], done, len(by_prompt)
