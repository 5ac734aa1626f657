"""Reports of an eval run: the Markdown table and the Pareto plots (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from selfjudge.io import atomic_path, atomic_write_text

COLUMNS = (
    "method",
    "threshold",
    "accuracy",
    "agreement_exact",
    "agreement_prefix",
    "mean_accepted_length",
    "acceptance_rate",
    "tokens_per_s",
    "speedup",
)


def _fmt(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _threshold(t: Any) -> str:
    return "-" if t is None else _fmt(float(t), ".4g")


def _hist(h: list[int]) -> str:
    """Accept-length histogram as shares of rounds: 'n:share' for every n with rounds."""
    total = sum(h)
    return " ".join(f"{n}:{c / total:.2f}" for n, c in enumerate(h) if c) if total else "-"


def _delta(r: dict[str, Any]) -> str:
    d, se = r.get("accuracy_vs_lossless"), r.get("accuracy_vs_lossless_se")
    return "-" if d is None else f"{d:+.3f}" + ("" if se is None else f" ± {se:.3f}")


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def markdown_table(rows: list[dict[str, Any]], title: str = "") -> str:
    """One line per (method, threshold): quality, speed and the accept-length histogram."""
    lines = [
        f"## {title}" if title else "",
        "",
        "| method | threshold | accuracy | vs lossless (± SE) | agree exact | agree prefix | accepted length "
        "| vs lossless | acceptance | tokens/s | speedup | rule / verify | accepted per round (share of rounds) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_threshold(r['threshold'])} | {_fmt(r['accuracy'], '.3f')} | {_delta(r)} "
            f"| {_fmt(r['agreement_exact'], '.3f')} | {_fmt(r['agreement_prefix'], '.3f')} "
            f"| {r['mean_accepted_length']:.2f} | {_fmt(r.get('accepted_length_vs_lossless'), '.2f')}x "
            f"| {_fmt(r['acceptance_rate'], '.3f')} | {r['tokens_per_s']:.2f} "
            f"| {_fmt(r['speedup'], '.2f')}x | {_share(r.get('rule_share_of_verify'))} | {_hist(r['accept_hist'])} |"
        )
    lines += [
        "",
        "accuracy: task score (prefix agreement with target-only where there is no checker); "
        "vs lossless: paired difference from lossless SD on the same prompts, ± its standard error, and the "
        "ratio of accepted lengths; "
        "accepted length: new tokens per target forward; speedup: tokens/s over target-only, same prompts, "
        "same process, warm-up excluded; rule / verify: the acceptance rule's time as a share of the verify phase.",
    ]
    return "\n".join(lines) + "\n"


def pareto_plot(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Accuracy against speedup and against accepted length, one curve per method, and (rows with
    paired fields) the accuracy difference from lossless SD with its standard error against the
    accepted-length ratio (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paired = any(r.get("accuracy_vs_lossless_se") is not None for r in rows)
    fig, axes = plt.subplots(1, 3 if paired else 2, figsize=(16 if paired else 11, 4.2))
    methods: dict[str, list[dict]] = {}
    for r in rows:
        methods.setdefault(r["method"], []).append(r)
    nan = float("nan")
    for i, (name, rs) in enumerate(methods.items()):
        style = dict(marker="*", markersize=12, linestyle="none") if len(rs) == 1 else dict(marker="o")
        style["color"] = f"C{i % 10}"  # one colour per method in every panel
        for ax, key in zip(axes, ("speedup", "mean_accepted_length")):
            pts = sorted(
                (r[key] if r[key] is not None else nan, r["accuracy"] if r["accuracy"] is not None else nan) for r in rs
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style)
        if paired and name not in ("target", "draft"):  # SD methods against lossless SD, same prompts
            pts = sorted(
                (
                    r.get("accepted_length_vs_lossless") or nan,
                    nan if r.get("accuracy_vs_lossless") is None else r["accuracy_vs_lossless"],
                    r.get("accuracy_vs_lossless_se") or 0.0,
                )
                for r in rs
            )
            axes[2].errorbar(
                [p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], label=name, capsize=3, **style
            )
    axes[0].set_xlabel("speedup over target-only (x)")
    axes[1].set_xlabel("mean accepted length (tokens per target forward)")
    for ax in axes[:2]:
        ax.set_ylabel("accuracy")
    if paired:
        axes[2].axhline(0.0, color="grey", lw=0.8)
        axes[2].axvline(1.0, color="grey", lw=0.8)
        axes[2].set_xlabel("accepted length / lossless SD's (x)")
        axes[2].set_ylabel("accuracy - lossless SD's (paired, ± SE)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def write_report(rows: list[dict[str, Any]], out_dir: str | Path, title: str) -> str:
    """report.md and pareto.png in out_dir; returns the Markdown."""
    text = markdown_table(rows, title)
    atomic_write_text(Path(out_dir) / "report.md", text)
    pareto_plot(rows, Path(out_dir) / "pareto.png", title)
    return text
