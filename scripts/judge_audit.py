"""What a trained judge accepts first: its P(important) on a data folder's held-out mismatches, by kind of swap.

    python scripts/judge_audit.py runs/x/data runs/x/judge/head                     # table; JSON with --out
    python scripts/judge_audit.py runs/x/data runs/x/judge/head --out docs/bench/judge_audit --examples 12
    python scripts/judge_audit.py runs/a/data,runs/b/data runs/x/judge/head --all   # folders it never saw

A judge accepts a mismatch when P(important) is below its cut, so at the q-quantile cut it accepts the share q
of mismatches it finds least important. This groups the held-out mismatches (the head's validation prompts, as
its judge_config.json records them; ``--all`` for every row) by kind of swap: numbers (the target's or the
draft's token holds a digit), punctuation or whitespace only, and words; and, where the folder stores
``target_top1_logp``, by the target's top-1 probability (the KL rule keeps strict verification above 0.9). Per
group: its share of the mismatches, its SelfJudge label rate, mean P(important), and its share of what the judge
accepts at each cut, with the enrichment (that share over its share of all mismatches: above 1, the judge
accepts the group first). Where the folders store ``kl`` and ``target_top1_logp`` (the signal study's layout),
the KL rule (strict above top-1 0.9) gets the same tables at the same acceptance shares, for comparison.
``--examples`` prints the number swaps the judge finds least important, in context.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from selfjudge.features import FeatureSpec
from selfjudge.io import write_json
from selfjudge.judge import JudgeHead
from selfjudge.shards import open_dataset

KINDS = ("number", "punctuation", "word")
TOP1_BINS = ((0.0, 0.5), (0.5, 0.7), (0.7, 0.9), (0.9, 1.0))


def kind(target: str, draft: str) -> str:
    """number: either token holds a digit; punctuation: neither holds a letter or digit; else word."""
    both = target + draft
    if any(c.isdigit() for c in both):
        return "number"
    if not any(c.isalnum() for c in both):
        return "punctuation"
    return "word"


def load_rows(data: Path, head: JudgeHead, every: bool) -> dict:  # one folder
    """The substituted rows the audit reads: the head's features (its subset of the stored layout), labels,
    prompt ids, tokens and the target's top-1 probability where stored."""
    ds, man = open_dataset(data)
    stored = FeatureSpec.from_mapping(man["features"])
    spec = FeatureSpec.from_mapping(head.config.features)
    H, Hd = int(man["target_model"]["hidden_size"]), man["draft_model"].get("hidden_size")
    meta = ds.with_format("numpy", columns=["substituted", "prompt_id"])[:]
    keep = np.asarray(meta["substituted"], dtype=bool)
    split = (head.config.extra or {}).get("split") or {}
    if not every:
        if not split.get("val_prompts"):
            raise SystemExit(
                "judge_audit: the head records no validation prompts (judge_config.json extra.split.val_prompts): "
                "pass --all to audit every row (then the rows it was trained on are in the table too)"
            )
        keep &= np.isin(np.asarray(meta["prompt_id"]).astype(str), list(split["val_prompts"]))
    idx = np.flatnonzero(keep)
    if not len(idx):
        raise SystemExit(f"judge_audit: {data} holds no substituted row of the prompts audited")
    cols = ["features", "label", "prompt_id", "position", "target_token", "draft_token", "response_ids"]
    rows = ds.select(idx).with_format("numpy", columns=cols)[:]
    x = np.asarray(rows["features"], dtype=np.float32)
    if spec != stored:
        x = x[:, spec.columns_in(stored, H, Hd)]
    have = stored.columns(H, Hd)
    raw = np.asarray(rows["features"], dtype=np.float64)
    top1 = np.exp(raw[:, have["target_top1_logp"].start]) if "target_top1_logp" in stored.scalars else None
    kl = raw[:, have["kl"].start] if "kl" in stored.scalars else None
    rows = {c: list(rows[c]) for c in cols if c != "features"}
    return {
        "x": x,
        "label": np.asarray(rows["label"]).astype(int),
        "rows": rows,
        "top1": top1,
        "kl": kl,
        "manifest": man,
    }


def load_all(folders: list[Path], head: JudgeHead, every: bool) -> dict:
    """load_rows over several folders (same target), concatenated."""
    parts = [load_rows(f, head, every) for f in folders]
    out = {
        "manifest": parts[0]["manifest"],
        "rows": {c: sum((p["rows"][c] for p in parts), []) for c in parts[0]["rows"]},
    }
    for k in ("x", "label", "top1", "kl"):
        out[k] = None if any(p[k] is None for p in parts) else np.concatenate([p[k] for p in parts])
    return out


def group_table(groups: np.ndarray, names: list[str], p: np.ndarray, label: np.ndarray, cuts: dict) -> list[dict]:
    """Per group: n, share, label rate, mean score and, per cut (accepted: score < cut), its share of the
    accepted and the enrichment."""
    out = []
    for g in names:
        m = groups == g
        row = {
            "group": g,
            "n": int(m.sum()),
            "share": float(m.mean()),
            "label_rate": float(label[m].mean()) if m.any() else None,
            "mean_p": float(p[m][np.isfinite(p[m])].mean()) if np.isfinite(p[m]).any() else None,
            "accepted": {},
        }
        for q, cut in cuts.items():
            acc = p < cut
            share = float((m & acc).sum() / max(1, acc.sum()))
            row["accepted"][q] = {"share": share, "enrichment": share / row["share"] if row["share"] else None}
        out.append(row)
    return out


def markdown(title: str, table: list[dict], levels: list[str], score: str = "mean P(important)") -> str:
    head = f"| {title} | n | share | label rate | {score} | "
    head += " | ".join(f"share of accepted at q{q} (enrichment)" for q in levels) + " |"
    lines = [head, "|---" * (5 + len(levels)) + "|"]
    for r in table:
        accepted = " | ".join(
            f"{r['accepted'][q]['share']:.3f} ({r['accepted'][q]['enrichment']:.2f}x)"
            if r["accepted"][q]["enrichment"] is not None
            else "-"
            for q in levels
        )
        rate = "-" if r["label_rate"] is None else f"{r['label_rate']:.3f}"
        mean = "-" if r["mean_p"] is None else f"{r['mean_p']:.3f}"
        lines.append(f"| {r['group']} | {r['n']} | {r['share']:.3f} | {rate} | {mean} | {accepted} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="finished data_gen folder(s), comma-separated (the head's, or with a superset of "
                    "its features)")  # fmt: skip
    ap.add_argument("head", help="judge head folder (train stage output: <run_dir>/judge/head)")
    ap.add_argument("--all", action="store_true", help="every prompt's rows, not only the head's validation prompts")
    ap.add_argument("--quantiles", default="0.1,0.2,0.3,0.4", help="cuts: quantiles of P(important) (0.1,...)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the folder's target)")
    ap.add_argument("--examples", type=int, default=0, help="print this many least-important number swaps")
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer

    head = JudgeHead.from_pretrained(a.head).eval()
    d = load_all([Path(f) for f in a.data.split(",") if f], head, a.all)
    with torch.no_grad():
        p = head.predict_proba(torch.from_numpy(d["x"])).double().numpy()
    target = d["manifest"]["target_model"]
    tok = AutoTokenizer.from_pretrained(a.tokenizer or target.get("folder") or target["name"])
    rows = d["rows"]
    text = lambda ids: tok.decode([int(i) for i in ids])  # noqa: E731
    kinds = np.array([kind(text([t]), text([s])) for t, s in zip(rows["target_token"], rows["draft_token"])])
    levels = [f"{float(q):g}" for q in a.quantiles.split(",")]
    cuts = {q: float(np.quantile(p, float(q))) for q in levels}
    result = {
        "data": a.data,
        "head": a.head,
        "rows": int(len(p)),
        "prompts": int(len(set(np.asarray(rows["prompt_id"]).astype(str)))),
        "held_out_only": not a.all,
        "cuts": cuts,
        "by_kind": group_table(kinds, list(KINDS), p, d["label"], cuts),
    }
    md = f"{len(p)} mismatches of {result['prompts']} prompts ({'every prompt' if a.all else 'held out'})\n\n"
    md += markdown("kind of swap", result["by_kind"], levels)
    if d["top1"] is not None:
        bins = np.array([f"{lo:g}-{hi:g}" for lo, hi in TOP1_BINS])
        which = np.clip(np.searchsorted([hi for _, hi in TOP1_BINS[:-1]], d["top1"], side="left"), 0, len(bins) - 1)
        result["by_target_top1"] = group_table(bins[which], list(bins), p, d["label"], cuts)
        md += "\n" + markdown("target top-1 probability", result["by_target_top1"], levels)
    if d["kl"] is not None and d["top1"] is not None:  # the KL rule at the same acceptance shares
        kl = np.where(d["top1"] > 0.9, np.inf, d["kl"])
        kl_cuts = {q: float(np.quantile(kl, float(q))) for q in levels}
        result["kl_rule"] = {"cuts": kl_cuts, "by_kind": group_table(kinds, list(KINDS), kl, d["label"], kl_cuts)}
        md += "\nThe KL rule (strict where the target's top-1 > 0.9), accepting the same shares of mismatches:\n\n"
        md += markdown("kind of swap (KL rule)", result["kl_rule"]["by_kind"], levels, "mean KL where not strict")
    if a.examples:
        order = [i for i in np.argsort(p, kind="stable") if kinds[i] == "number"][: a.examples]
        md += "\nNumber swaps it finds least important (context | target -> draft | what the target wrote next):\n\n"
        for i in order:
            resp, at = rows["response_ids"][i], int(rows["position"][i])
            ctx, nxt = text(resp[max(0, at - 10) : at]), text(resp[at + 1 : at + 5])
            t, s = text([rows["target_token"][i]]), text([rows["draft_token"][i]])
            md += f"- P={p[i]:.3f} label={d['label'][i]} `{ctx!r}` | `{t!r}` -> `{s!r}` | `{nxt!r}`\n"
        result["examples"] = [int(i) for i in order]
    print(md)
    if a.out:
        write_json(Path(f"{a.out}.json"), result)
        Path(f"{a.out}.md").write_text(md)
        print(f"-> {a.out}.json, {a.out}.md")
    return result


if __name__ == "__main__":
    main()
