"""Re-score an eval folder (finished, partial or running) with the current answer checkers, without decoding.

    python scripts/rescore_eval.py runs/<experiment>/eval [--out rescored.json]

Reads ``eval_key.json`` (which dataset) and ``per_example.jsonl`` (each output's text and the score it got),
scores every text again (``selfjudge.evaluation.rescore``, as the eval stage does when it next runs on the
folder) and prints, per method and threshold, the stored accuracy, the new one and how many outputs changed
score. Writes the table as JSON (default <folder>/rescored.json); the records are left as they are.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from selfjudge.evaluation import RecordsFile, folder_task, rescore
from selfjudge.io import write_json


def rescored_rows(eval_dir: Path) -> list[dict]:
    out = RecordsFile(eval_dir)
    task = folder_task(out)
    if task is None:
        raise SystemExit(f"rescore_eval: {out.key_path} names no dataset: is {eval_dir} an eval output folder?")
    recs = [r for r in out.read(repair=False) if r.get("score") is not None]
    stored = [float(r["score"]) for r in recs]
    rescore(recs, task, task.examples())
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r, old in zip(recs, stored):
        groups[(r["method"], r["threshold"])].append((old, float(r["score"])))
    rows = []
    for (method, thr), pairs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        n = len(pairs)
        rows.append(
            {
                "method": method,
                "threshold": thr,
                "examples": n,
                "stored_accuracy": sum(a for a, _ in pairs) / n,
                "new_accuracy": sum(b for _, b in pairs) / n,
                "changed": sum(a != b for a, b in pairs),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("eval_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default <eval_dir>/rescored.json)")
    args = ap.parse_args(argv)
    rows = rescored_rows(args.eval_dir)
    print("| method | threshold | examples | stored accuracy | new accuracy | outputs that changed score |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['threshold']} | {r['examples']} | {r['stored_accuracy']:.3f} | "
            f"{r['new_accuracy']:.3f} | {r['changed']} |"
        )
    write_json(args.out or args.eval_dir / "rescored.json", {"eval_dir": str(args.eval_dir), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
