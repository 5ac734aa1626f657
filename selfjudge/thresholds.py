"""Thresholds picked on a validation slice: per method, the settings that bracket lossless SD's accuracy.

The project's rule: a rule's thresholds are chosen on validation problems (another slice of a task, e.g.
GSM8K train problems the judge was not trained on), never on the problems an eval reports. The input is
the records of one validation eval (``RecordsFile(...).read()``) that decoded every method at several
thresholds and lossless SD on the same prompts. Per method (the eval.methods name: ``kl``, ``judge``,
``judge_mlp``, ...) :func:`choose` picks up to three thresholds, ordered by looseness (mean accepted
length, the report's "accepted length"):

- ``at_lossless``: the loosest one whose paired accuracy difference to lossless is >= 0;
- ``within_loss``: the loosest one whose difference is >= -max_loss (default 0.02: 2 points);
- ``looser``: the next looser one than ``within_loss`` (the trade-off just beyond the budget).

Ties (equal accepted length) go to the higher accuracy difference, then to the lower threshold. A criterion
no threshold meets is None, with a note that says so.

A record's threshold is the number its rule ran with: a judge swept at ``head_quantiles`` stores the head's
P(important) cuts (``build_grid`` expands the stored quantiles), not their quantile levels, so the
overrides carry those numeric cuts, which ``eval.methods.judge`` takes; :func:`quantile_levels` maps a
head's cuts back to their levels for display.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from selfjudge.evaluation import BASELINES
from selfjudge.metrics import aggregate, paired_with, unique_records

TOL = 1e-9  # accuracy differences are means of per-prompt differences: float noise is not a loss
CRITERIA = ("at_lossless", "within_loss", "looser")


def threshold_value(t: Any) -> float:
    """A record's threshold as a number (a number, or a string of one); anything else is an error."""
    try:
        return float(t)
    except (TypeError, ValueError):
        raise ValueError(
            f"threshold {t!r} is not a number: records store the cut each rule ran with (a judge's "
            "head_quantiles are stored as the head's P(important) cuts); was the file written by this eval?"
        ) from None


def threshold_rows(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Lossless SD (the reference) and one row per (method, threshold) of every rule: prompts shared with
    lossless (``n``), accuracy, mean accepted length and the paired accuracy difference to lossless ± SE,
    all on those prompts. Methods come in the order of their first record, each one's rows by threshold."""
    recs = unique_records(records)
    lossless = [r for r in recs if r["method"] == "lossless"]
    if not lossless:
        raise ValueError(
            "no lossless records: the validation eval must decode lossless SD on the same prompts "
            "(it always does; is the file cut before the first prompt finished?)"
        )
    ref = aggregate(lossless)
    rows = [
        {
            "method": "lossless",
            "policy": "lossless",
            "threshold": None,
            "n": ref["examples"],
            "accuracy": ref["accuracy"],
            "accuracy_vs_lossless": 0.0,
            "accuracy_vs_lossless_se": None,
            "mean_accepted_length": ref["mean_accepted_length"],
            "accepted_length_vs_lossless": 1.0,
        }
    ]
    shared = {r["prompt_id"] for r in lossless}
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in recs:
        if r["method"] not in BASELINES:
            groups.setdefault((r["method"], threshold_value(r["threshold"])), []).append(r)
    first = {m: i for i, m in enumerate(dict.fromkeys(m for m, _ in groups))}  # methods in the eval's order
    for (method, t), mine in sorted(groups.items(), key=lambda kv: (first[kv[0][0]], kv[0][1])):
        mine = [r for r in mine if r["prompt_id"] in shared]
        if not mine:
            raise ValueError(
                f"{method} at threshold {t:g} has no prompt that lossless also decoded: the validation eval "
                "must run lossless on the same prompts (pass every record of one eval folder)"
            )
        agg = aggregate(mine)
        rows.append(
            {
                "method": method,
                "policy": mine[0].get("policy", method),
                "threshold": t,
                "n": agg["examples"],
                "accuracy": agg["accuracy"],
                **paired_with(mine, lossless),
                "mean_accepted_length": agg["mean_accepted_length"],
            }
        )
    return rows


def _looseness(r: dict[str, Any]) -> tuple:
    """Sort key, loosest first: accepted length, then the better accuracy difference, then the lower threshold."""
    d = r["accuracy_vs_lossless"]
    return (-r["mean_accepted_length"], -(d if d is not None else -math.inf), r["threshold"])


def choose(rows: Iterable[dict[str, Any]], max_loss: float = 0.02) -> dict[str, dict[str, Any]]:
    """Per method: the threshold meeting each criterion (module docstring; None: none does), ``chosen``
    (those thresholds, distinct, ascending), ``why`` (:func:`format_threshold` of a chosen threshold -> the
    criteria it meets) and ``notes`` (plain sentences for each criterion no threshold meets)."""
    if not (isinstance(max_loss, (int, float)) and max_loss >= 0):
        raise ValueError(
            f"max_loss must be a number >= 0 (accuracy points as a fraction: 0.02 = 2 points), got {max_loss!r}"
        )
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] not in BASELINES:
            by_method.setdefault(r["method"], []).append(r)
    out = {}
    for method, rs in by_method.items():
        order = sorted(rs, key=_looseness)
        scored = [r for r in order if r["accuracy_vs_lossless"] is not None]
        at = next((r for r in scored if r["accuracy_vs_lossless"] >= -TOL), None)
        within = next((r for r in scored if r["accuracy_vs_lossless"] >= -max_loss - TOL), None)
        looser = None
        longer = [r for r in order if within is not None and r["mean_accepted_length"] > within["mean_accepted_length"]]
        if longer:  # the next step out: the shortest of the longer ones (the first of them in loosest-first order)
            looser = next(r for r in longer if r["mean_accepted_length"] == longer[-1]["mean_accepted_length"])
        picks = {"at_lossless": at, "within_loss": within, "looser": looser}
        why: dict[str, list[str]] = {}
        for crit, r in picks.items():
            if r is not None:
                why.setdefault(format_threshold(r["threshold"]), []).append(crit)
        notes = []
        if at is None:
            notes.append(f"{method}: no threshold reaches lossless accuracy (paired difference >= 0)")
        if within is None:
            notes.append(
                f"{method}: no threshold is within {max_loss:g} of lossless accuracy: evaluate stricter thresholds"
            )
        elif looser is None:
            notes.append(
                f"{method}: no evaluated threshold is looser than {within['threshold']:g} "
                "(evaluate looser ones to see the trade-off)"
            )
        unscored = [r["threshold"] for r in rs if r["accuracy_vs_lossless"] is None]
        if unscored:
            notes.append(f"{method}: thresholds {unscored} have no scored prompt shared with lossless (not ranked)")
        out[method] = {
            "policy": rs[0]["policy"],
            **{k: (None if r is None else r["threshold"]) for k, r in picks.items()},
            "chosen": sorted({r["threshold"] for r in picks.values() if r is not None}),
            "why": why,
            "notes": notes,
        }
    return out


def format_threshold(t: float) -> str:
    """A threshold as hydra reads it back to the same float (shortest round-trip form)."""
    return repr(float(t))


def overrides(choices: Mapping[str, dict[str, Any]], mapped: Collection[str] = ()) -> list[str]:
    """Hydra overrides of the chosen thresholds, one per method that has any: ``eval.methods.kl=[0.5,1.0]``;
    a method given as a map (``{policy, thresholds, head_dir}``: its policy is not its name, or it is in
    ``mapped``) gets ``eval.methods.<name>.thresholds=[...]``."""
    out = []
    for method, c in choices.items():
        if not c["chosen"]:
            continue
        key = f"eval.methods.{method}" + (".thresholds" if method in mapped or c["policy"] != method else "")
        out.append(f"{key}=[{','.join(format_threshold(t) for t in c['chosen'])}]")
    return out


def quantile_levels(head_thresholds: Mapping[str, Any]) -> dict[float, float]:
    """A judge head's stored sweep (judge_config.json ``thresholds``): P(important) cut -> quantile level."""
    cuts = head_thresholds.get("quantiles") or []
    levels = head_thresholds.get("quantile_levels") or []
    if len(cuts) != len(levels):
        return {}  # an older head without levels (or a mangled one): cuts are shown without them
    return {float(c): float(q) for c, q in zip(cuts, levels)}
