"""Re-score a finished (or partial) eval folder with the current answer checkers, without decoding again.

    python scripts/rescore_eval.py runs/<experiment>/eval [--out rescored.json]

Reads ``summary.json`` (the eval config: which dataset) and ``per_example.jsonl`` (each output's text and
the score it got), scores every text again with ``selfjudge.tasks`` and prints, per method and threshold,
the stored accuracy, the new one and how many outputs changed score. Writes the table as JSON beside them.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from selfjudge.io import read_json, write_json
from selfjudge.tasks import build_task


def rescore(eval_dir: Path) -> list[dict]:
    cfg = read_json(eval_dir / "summary.json")["config"]
    task = build_task(cfg["dataset"])
    by_id = {ex.id: ex for ex in task.examples()}
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for line in (eval_dir / "per_example.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("score") is None or r["prompt_id"] not in by_id:
            continue
        new = task.score(by_id[r["prompt_id"]], r["text"])
        groups[(r["method"], r["threshold"])].append((float(r["score"]), float(new)))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("eval_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default <eval_dir>/rescored.json)")
    args = ap.parse_args()
    rows = rescore(args.eval_dir)
    print("| method | threshold | examples | stored accuracy | new accuracy | outputs that changed score |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['threshold']} | {r['examples']} | {r['stored_accuracy']:.3f} | "
            f"{r['new_accuracy']:.3f} | {r['changed']} |"
        )
    write_json(args.out or args.eval_dir / "rescored.json", {"eval_dir": str(args.eval_dir), "rows": rows})


if __name__ == "__main__":
    main()
