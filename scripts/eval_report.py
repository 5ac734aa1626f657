"""Report of an eval that is still running or was stopped: the prompts every method has finished.

    python scripts/eval_report.py runs/qwen/eval            # writes runs/qwen/eval/partial/{report.md,pareto.png,summary.json}

The eval stage writes summary.json, report.md and pareto.png only when every prompt is done; its
per_example.jsonl grows as decodes finish (all methods of one prompt back to back). This reads that
file without touching it, keeps the prompts that have a record for every (method, threshold) seen, and
builds the same rows and plots from them (speedup against target-only on those prompts). A multi-rank eval's
records are read from each rank's file too.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from selfjudge.evaluation import RecordsFile, rescore_read
from selfjudge.io import write_json
from selfjudge.metrics import finished_by_all, summary_rows
from selfjudge.report import write_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("eval_dir", help="an eval output folder holding per_example.jsonl")
    ap.add_argument("--out", default=None, help="output folder (default: <eval_dir>/partial)")
    args = ap.parse_args()
    src = Path(args.eval_dir) / "per_example.jsonl"
    ranks = sorted(Path(args.eval_dir).glob("per_example.rank*.jsonl"))  # a multi-rank eval's, until it merges
    if not src.is_file() and not ranks:
        raise SystemExit(f"eval_report: {src} does not exist: pass the eval output folder (eval.output_dir)")
    records = RecordsFile(args.eval_dir)
    recs = records.read(repair=False) if src.is_file() else []  # a line cut by a kill (or a running eval): left out
    recs += [r for part in ranks for r in records.read(part, repair=False)]
    rescored = rescore_read(RecordsFile(args.eval_dir), recs)
    if rescored:
        print(f"{rescored} records scored by an earlier revision of the answer checker: re-scored here (the eval "
              "stage rewrites them when it next runs)")  # fmt: skip
    methods = list(dict.fromkeys((r["method"], r["threshold"]) for r in recs))
    if ("target", None) not in methods:
        raise SystemExit(f"eval_report: no target-only records in {src}: nothing to measure speedup against")
    keep, complete, started = finished_by_all(recs)
    if not complete:
        raise SystemExit(f"eval_report: no prompt of {src} is finished by every method yet")
    rows = summary_rows(keep, methods)
    key_path = Path(args.eval_dir) / "eval_key.json"
    settings = json.loads(key_path.read_text()).get("settings", {}) if key_path.is_file() else {}
    title = (
        f"partial: {len(complete)} of {started} started prompts finished by every method; "
        f"gamma={settings.get('gamma')}, max_new_tokens={settings.get('max_new_tokens')}"
    )
    out = Path(args.out) if args.out else Path(args.eval_dir) / "partial"
    out.mkdir(parents=True, exist_ok=True)
    print(write_report(rows, out, title))
    write_json(
        out / "summary.json",
        {
            "complete": False,
            "title": title,
            "prompts": sorted(complete),
            "rows": rows,
            "load_average_1_5_15": list(os.getloadavg()),
        },
    )
    print(f"-> {out}")


if __name__ == "__main__":
    main()
