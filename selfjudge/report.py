"""Reports: the Markdown table and the Pareto plots of an eval run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfjudge.io import atomic_write_text


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(rows: list[dict[str, Any]], header: str = "") -> str:
    lines = [header, "", "| method | threshold | accuracy | accepted length | acceptance | tokens/s | speedup |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_fmt(r['threshold'], '.4g') if isinstance(r['threshold'], (int, float)) else '-'} "
            f"| {_fmt(r['accuracy'], '.3f')} | {r['mean_accepted_length']:.2f} | {_fmt(r['acceptance_rate'], '.3f')} "
            f"| {r['tokens_per_s']:.2f} | {_fmt(r['speedup'], '.2f')}x |")
    return "\n".join(lines) + "\n"


def pareto_plot(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Accuracy against speedup and against accepted length, one curve per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods: dict[str, list[dict]] = {}
    for r in rows:
        methods.setdefault(r["method"], []).append(r)
    for name, rs in methods.items():
        for ax, key in zip(axes, ("speedup", "mean_accepted_length")):
            pts = sorted((r[key] or 0.0, r["accuracy"] if r["accuracy"] is not None else float("nan")) for r in rs)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    axes[0].set_xlabel("speedup over target-only (x)")
    axes[1].set_xlabel("mean accepted length (tokens per target forward)")
    for ax in axes:
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(rows: list[dict[str, Any]], out_dir: str | Path, title: str) -> str:
    text = markdown_table(rows, f"## {title}")
    atomic_write_text(Path(out_dir) / "report.md", text)
    pareto_plot(rows, Path(out_dir) / "pareto.png", title)
    return text
