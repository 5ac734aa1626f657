"""Metrics equal hand-computed values; the Markdown table and the Pareto plot are written."""

from __future__ import annotations

import math

import pytest

from selfjudge.metrics import add_hist, aggregate, paired_with, prefix_agreement, summary_rows
from selfjudge.report import markdown_table, pareto_plot, write_report


def _rec(new, rounds, prop, acc, secs, score, hist, exact=1.0, prefix=1.0, by_rule=0):
    return {
        "new_tokens": new,
        "rounds": rounds,
        "draft_forwards": prop,
        "proposed": prop,
        "accepted": acc,
        "accepted_by_rule": by_rule,
        "seconds": secs,
        "score": score,
        "accept_hist": hist,
        "agree_exact": exact,
        "agree_prefix": prefix,
    }


def test_aggregate_hand_computed():
    base = aggregate([_rec(10, 10, 0, 0, 2.0, 1.0, [0]), _rec(30, 30, 0, 0, 6.0, 0.0, [0])])
    assert base["tokens_per_s"] == 40 / 8.0 and base["mean_accepted_length"] == 1.0
    assert base["acceptance_rate"] is None and base["accuracy"] == 0.5 and base["speedup"] is None
    sd = aggregate(
        [
            _rec(12, 4, 16, 8, 1.0, 1.0, [1, 0, 2, 0, 1], exact=1.0, prefix=1.0),
            _rec(20, 5, 20, 15, 3.0, None, [0, 1, 2, 1, 1, 0, 0], exact=0.0, prefix=0.25, by_rule=3),
        ],
        baseline_tokens_per_s=base["tokens_per_s"],
    )
    assert sd["mean_accepted_length"] == 32 / 9
    assert sd["acceptance_rate"] == 23 / 36
    assert sd["tokens_per_s"] == 32 / 4.0 and sd["speedup"] == pytest.approx(8.0 / 5.0)
    assert sd["accuracy"] == 1.0  # None scores are left out
    assert sd["agreement_exact"] == 0.5 and sd["agreement_prefix"] == 0.625
    assert sd["accept_hist"] == [1, 1, 4, 1, 2, 0, 0] and sd["accepted_by_rule"] == 3


def _tag(rec, method, pid, threshold=None):
    return {**rec, "method": method, "prompt_id": pid, "threshold": threshold}


def test_paired_with_lossless_hand_computed(tmp_path):
    ref = [_tag(_rec(10, 5, 0, 0, 1.0, s, [0]), "lossless", f"p{i}") for i, s in enumerate([1.0, 1.0, 0.0, 1.0])]
    mine = [
        _tag(_rec(12, 4, 0, 0, 1.0, s, [0]), "judge", f"p{i}", 0.3) for i, s in enumerate([1.0, 0.0, 1.0, 0.0, 1.0])
    ]
    got = paired_with(mine, ref)  # p4 has no lossless record: left out
    diffs = [0.0, -1.0, 1.0, -1.0]
    mean = sum(diffs) / 4
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3 / 4)
    assert got["accuracy_vs_lossless"] == mean and got["accuracy_vs_lossless_se"] == pytest.approx(se)
    assert got["accepted_length_vs_lossless"] == pytest.approx((48 / 16) / (40 / 20))
    rows = summary_rows(
        [_tag(_rec(10, 10, 0, 0, 2.0, 1.0, [0]), "target", f"p{i}") for i in range(4)] + ref + mine,
        [("target", None), ("lossless", None), ("judge", 0.3)],
    )
    assert [r["method"] for r in rows] == ["target", "lossless", "judge"]
    assert rows[1]["accuracy_vs_lossless"] == 0.0 and rows[1]["accepted_length_vs_lossless"] == 1.0
    assert rows[2]["speedup"] == pytest.approx((60 / 5.0) / (40 / 8.0)) and rows[2]["accuracy_vs_lossless"] == mean
    assert "-0.250 ± 0.479" in markdown_table(rows)
    assert pareto_plot(rows, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"  # third panel: vs lossless


def test_prefix_agreement_and_hist():
    assert prefix_agreement([1, 2, 3], [1, 2, 4, 5]) == 0.5
    assert prefix_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert prefix_agreement([7], [1, 2]) == 0.0
    assert prefix_agreement([], []) == 1.0 and prefix_agreement([1], []) == 0.0
    assert add_hist([1, 2], [0, 1, 5]) == [1, 3, 5] and add_hist([], []) == []


def _rows():
    mk = lambda m, t, acc, spd, al, h: {
        "method": m,
        "policy": m,
        "threshold": t,
        "accuracy": acc,  # noqa: E731
        "agreement_exact": 1.0,
        "agreement_prefix": 1.0,
        "mean_accepted_length": al,
        "acceptance_rate": None if m == "target" else 0.5,
        "tokens_per_s": 10 * spd,
        "speedup": spd,
        "accept_hist": h,
    }
    return [
        mk("target", None, 0.8, 1.0, 1.0, [0]),
        mk("lossless", None, 0.8, 1.6, 2.5, [1, 1, 2]),
        mk("judge", 0.3, 0.78, 2.0, 3.1, [0, 1, 3]),
        mk("judge", 0.5, 0.7, 2.4, 3.9, [0, 0, 4]),
        mk("topk", 2.0, None, 1.9, 3.0, [0, 0, 0]),
    ]


def test_markdown_table_lists_every_row(tmp_path):
    text = markdown_table(_rows(), "gsm8k: 2 prompts")
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + 5  # header + one row per (method, threshold)
    assert "| judge | 0.3 | 0.780 |" in text and "| target | - | 0.800 |" in text
    assert "| 2.40x |" in text and "0:0.25 1:0.25 2:0.50" in text  # speedup and the accept-length shares
    assert "| topk | 2 | - |" in text  # no accuracy: a dash, not a crash


def test_write_report_writes_table_and_png(tmp_path):
    text = write_report(_rows(), tmp_path, "title")
    assert (tmp_path / "report.md").read_text() == text
    png = (tmp_path / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not list(tmp_path.glob(".*tmp*"))  # atomic: no leftovers
    pareto_plot(_rows()[:1], tmp_path / "one.png")  # a single point still plots
    assert (tmp_path / "one.png").is_file()
