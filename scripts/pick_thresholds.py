"""Pick each rule's thresholds on a validation eval: the ones that bracket lossless SD's accuracy.

    python scripts/pick_thresholds.py runs/qwen/eval_val                      # table, thresholds.json, overrides
    python scripts/pick_thresholds.py runs/qwen/eval_val --max-loss 0.01 --out val.json --head judge=runs/q/judge/head
    python scripts/pick_thresholds.py runs/qwen/eval_val --methods kl,typical   # only these (others still decoding)

The folder is the output of an eval on validation problems (never the problems the eval reports) that swept
every rule over several thresholds. This reads its per_example.jsonl without touching it (a running eval's
too: only the prompts every (method, threshold) has finished), prints a Markdown table per (method,
threshold) with the paired accuracy difference to lossless SD ± SE, writes it and the choices as JSON
(default <folder>/thresholds.json) and prints the hydra overrides for the eval run (selfjudge.thresholds
says how each threshold is picked). A judge's thresholds are P(important) cuts; with its head folder
known (the eval's summary.json, or --head) the table also names each cut's quantile level.
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Mapping
from pathlib import Path

from selfjudge.evaluation import HEAD_DIR_KEYS, RECORDS, RecordsFile, rescore_read
from selfjudge.io import write_json
from selfjudge.judge import CONFIG_NAME
from selfjudge.metrics import finished_by_all
from selfjudge.thresholds import choose, format_threshold, overrides, quantile_levels, threshold_rows

REFERENCES = {"lossless", "target"}  # rows every pick compares with, never chosen themselves
LABELS = {"at_lossless": ">= lossless", "within_loss": "within {m:g}", "looser": "looser (trade-off)"}


def _eval_config(eval_dir: Path) -> dict:
    """The eval section of a finished eval (summary.json), else {}."""
    p = eval_dir / "summary.json"
    return (json.loads(p.read_text()).get("config") or {}) if p.is_file() else {}


def _head_dirs(choices: Mapping[str, dict], config: Mapping, given: list[str]) -> dict[str, str]:
    """Method -> its judge head folder: --head NAME=DIR, else the one the eval's config names."""
    out = {}
    methods = config.get("methods") or {}
    for name, c in choices.items():
        if c["policy"] not in HEAD_DIR_KEYS:
            continue
        spec = methods.get(name)
        folder = spec.get("head_dir") if isinstance(spec, Mapping) else None
        out[name] = folder or config.get(HEAD_DIR_KEYS.get(name, HEAD_DIR_KEYS[c["policy"]]))
    for item in given:
        name, sep, folder = item.partition("=")
        if not sep or name not in choices:
            raise SystemExit(f"pick_thresholds: --head {item!r}: expected NAME=DIR with NAME one of {sorted(choices)}")
        out[name] = folder
    return {k: v for k, v in out.items() if v}


def _levels(heads: Mapping[str, str]) -> dict[str, dict[float, float]]:
    out = {}
    for name, folder in heads.items():
        p = Path(folder) / CONFIG_NAME
        if not p.is_file():
            raise SystemExit(
                f"pick_thresholds: no {CONFIG_NAME} in {folder} (head folder of {name}): pass --head {name}=DIR"
            )
        out[name] = quantile_levels(json.loads(p.read_text()).get("thresholds") or {})
    return out


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict], choices: Mapping[str, dict], levels: Mapping[str, dict], max_loss: float) -> str:
    lines = [
        "| method | threshold | n | accuracy | vs lossless (± SE) | accepted length | vs lossless | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, d, se = r["threshold"], r["accuracy_vs_lossless"], r["accuracy_vs_lossless_se"]
        if t is None:
            shown, delta, chosen = "-", "reference", "-"
        else:
            q = levels.get(r["method"], {}).get(t)
            shown = f"{t:.4g}" + ("" if q is None else f" (q{q:g})")
            delta = "-" if d is None else f"{d:+.3f}" + ("" if se is None else f" ± {se:.3f}")
            why = choices[r["method"]]["why"].get(format_threshold(t), [])
            chosen = "yes: " + ", ".join(LABELS[c].format(m=max_loss) for c in why) if why else "-"
        lines.append(
            f"| {r['method']} | {shown} | {r['n']} | {_fmt(r['accuracy'], '.3f')} | {delta} "
            f"| {r['mean_accepted_length']:.2f} | {_fmt(r['accepted_length_vs_lossless'], '.2f')}x | {chosen} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("eval_dir", help="output folder (eval.output_dir) of an eval on validation problems")
    ap.add_argument("--max-loss", type=float, default=0.02, help="accuracy loss budget vs lossless (0.02: 2 points)")
    ap.add_argument("--out", default=None, help="JSON file to write (default: <eval_dir>/thresholds.json)")
    ap.add_argument("--head", action="append", default=[], metavar="NAME=DIR", help="judge method's head folder")
    ap.add_argument(
        "--methods",
        default=None,
        metavar="NAME,...",
        help="pick for these methods only (lossless and target kept as references); the others' records, "
        "finished or not, are ignored",
    )
    args = ap.parse_args(argv)
    eval_dir = Path(args.eval_dir)
    src = eval_dir / RECORDS
    if not src.is_file():
        raise SystemExit(
            f"pick_thresholds: {src} does not exist: pass the validation eval's output folder (eval.output_dir)"
        )
    if args.max_loss < 0:
        raise SystemExit(f"pick_thresholds: --max-loss must be >= 0 (0.02 = 2 accuracy points), got {args.max_loss}")
    recs = RecordsFile(eval_dir).read(repair=False)  # a cut last line: left out
    rescored = rescore_read(RecordsFile(eval_dir), recs)
    if rescored:
        print(f"{rescored} records scored by an earlier revision of the answer checker: re-scored here (the eval "
              "stage rewrites them when it next runs)")  # fmt: skip
    if args.methods is not None:
        wanted = {m.strip() for m in args.methods.split(",") if m.strip()}
        seen = {r["method"] for r in recs}
        unknown = sorted(wanted - seen)
        if unknown:
            raise SystemExit(
                f"pick_thresholds: --methods {','.join(unknown)}: no records in {src} (it has {', '.join(sorted(seen))})"
            )
        recs = [r for r in recs if r["method"] in wanted | REFERENCES]
    recs, done, started = finished_by_all(recs)
    if not done:
        raise SystemExit(f"pick_thresholds: no prompt of {src} is finished by every (method, threshold) yet")
    try:
        rows = threshold_rows(recs)
    except ValueError as e:
        raise SystemExit(f"pick_thresholds: {src}: {e}") from None
    choices = choose(rows, args.max_loss)
    if not choices:
        raise SystemExit(f"pick_thresholds: {src} holds no rule records (eval.methods): nothing to choose")
    config = _eval_config(eval_dir)
    mapped = {k for k, v in (config.get("methods") or {}).items() if isinstance(v, Mapping)}
    mapped |= {k for k, c in choices.items() if c["policy"] != k}  # {policy, thresholds, head_dir} methods
    levels = _levels(_head_dirs(choices, config, args.head))
    picked = overrides(choices, mapped)
    print(f"## Thresholds on {len(done)} validation prompts ({started} started), max loss {args.max_loss:g}\n")
    print(table(rows, choices, levels, args.max_loss))
    for c in choices.values():
        for note in c["notes"]:
            print(f"- {note}")
    out = Path(args.out) if args.out else eval_dir / "thresholds.json"
    result = {
        "eval_dir": str(eval_dir),
        "max_loss": args.max_loss,
        "prompts": done,
        "started_prompts": started,
        "rows": rows,
        "choices": choices,
        "quantile_levels": {k: {format_threshold(c): q for c, q in v.items()} for k, v in levels.items()},
        "overrides": picked,
    }
    write_json(out, result)
    print(f"\n-> {out}\n\nOverrides for the eval on the evaluation problems (thresholds picked above):\n")
    print("  " + " ".join(shlex.quote(o) for o in picked) if picked else "  (none: no method has a chosen threshold)")
    for name, c in choices.items():
        if not c["chosen"]:
            print(f"  # {name}: nothing chosen; keep its thresholds or leave it out with '~eval.methods.{name}'")
    if mapped & {k for k, c in choices.items() if c["chosen"]}:
        print("  # eval.methods.<name>.thresholds overrides go after the setting that defines that method")
    return result


if __name__ == "__main__":
    main()
