"""Pick the best head of a hydra sweep by validation ROC-AUC and copy it to ``<run_dir>/judge/best``.

    selfjudge-train -m +hparams_search=judge_grid run_dir=runs/qwen
    python -m selfjudge.train.select runs/qwen/multirun/<time>            # -> runs/qwen/judge/best
    python -m selfjudge.train.select runs/qwen/multirun/<time> --out runs/qwen/judge/head   # replace the default head

Each job folder holds ``judge/metrics.json`` (train.output_dir of the sweep is the job's folder). The chosen
job's overrides are written to ``<out>/selected.json``; eval then reads ``--out`` like any head folder.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from selfjudge.io import write_json
from selfjudge.judge import JudgeHead


def sweep_results(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One entry per finished job: folder, validation ROC-AUC, PR-AUC, head folder, hydra overrides."""
    sweep_dir = Path(sweep_dir)
    out = []
    for mpath in sorted(sweep_dir.rglob("metrics.json")):
        m = json.loads(mpath.read_text())
        if "final" not in m or not (Path(m["head_dir"]) / "judge_config.json").is_file():
            continue
        job = mpath.parent.parent
        ov = job / ".hydra" / "overrides.yaml"
        out.append(
            {
                "job": str(job),
                "roc_auc": m["final"]["roc_auc"],
                "pr_auc": m["final"]["pr_auc"],
                "head_dir": m["head_dir"],
                "overrides": _overrides(ov),
                "judge": m.get("judge"),
                "lr": m.get("lr"),
                "weight_decay": m.get("weight_decay"),
            }
        )
    if not out:
        raise FileNotFoundError(f"no finished sweep jobs (judge/metrics.json with a head) under '{sweep_dir}'")
    return out


def _overrides(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [ln[2:].strip() for ln in path.read_text().splitlines() if ln.startswith("- ")]


def select_best(sweep_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """Copy the head with the highest validation ROC-AUC to ``out`` (atomically); returns the choice."""
    results = [r for r in sweep_results(sweep_dir) if not math.isnan(r["roc_auc"])]
    best = max(results, key=lambda r: r["roc_auc"])
    head = JudgeHead.from_pretrained(best["head_dir"])
    head.config.extra["selected_from"] = {"sweep": str(sweep_dir), "job": best["job"], "overrides": best["overrides"]}
    out = Path(out)
    head.save_pretrained(out)
    write_json(out / "selected.json", {"best": best, "all": sorted(results, key=lambda r: -r["roc_auc"])})
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", help="a hydra multirun folder: ${run_dir}/multirun/<time>")
    ap.add_argument("--out", default=None, help="where the best head goes (default: <run_dir>/judge/best)")
    a = ap.parse_args(argv)
    sweep = Path(a.sweep_dir)
    out = Path(a.out) if a.out else sweep.parent.parent / "judge" / "best"
    best = select_best(sweep, out)
    print(f"[select] best ROC-AUC {best['roc_auc']:.4f} from {best['job']} ({' '.join(best['overrides'])}) -> {out}")


if __name__ == "__main__":
    main()
