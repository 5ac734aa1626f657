"""Which accepted swap changes a decoded answer: greedy continuations from every swap of the response.

    python scripts/flip_trace.py docs/bench/evidence_val_gsm8k_g8_b64 --method kl@0.5 \
      --method autojudge_gsm8k@4.568855416241042e-05 --head autojudge_gsm8k=runs/x/autojudge_gsm8k/judge/head \
      --gsm8k-dir data/gsm8k --out docs/bench/flip_trace_val_gsm8k -- model.dtype=bfloat16 model.cpu_kernels=onednn

Every teacher-forced label (SelfJudge's LD, AutoJudge's answer change) judges *one* swap put into the target's
own greedy response. A decode with a loose rule accepts many swaps per response, each after the earlier ones
have moved the text off that path. This reads an eval's records (its folder, or the committed
``<prefix>.per_example.jsonl.gz`` and ``<prefix>.eval_key.json`` that ``scripts/judge_evidence.py`` archives) and, for every response of a
method whose score differs from the target's own (``target`` method) response of the same prompt:

1. teacher-forces the response ``y`` through the target (and the draft, for KL): the swaps are the tokens
   that are not the target's argmax after ``y``'s own prefix (the mismatches the rule accepted), each with the
   target's top-1 probability, its gap to the swap, KL(q‖p), the kind of swap (number, punctuation, word)
   and, where ``--head`` names the method's head folder, the head's P(important) from the same features the
   verify pass reads;
2. lets the target continue greedily after ``y`` up to and including swap j, for j = 0 (the prefix before
   the first swap: the target's own response again) .. k (the last), within the eval's token budget, and
   scores each continuation with the task's checker. ``--scan bisect`` (default) makes j = 0, j = k and then
   a bisection between them (about log2(k) + 2 continuations per response, in rounds that batch every
   response's next one); ``--scan all`` makes every j.

The swap whose continuation scores otherwise than the one before it (the first such with ``--scan all``) is
the swap that turned the answer (the "culprit"): j = 1 is a swap on the target's own path, the case a
teacher-forced label describes; a later j is one made off it. Per method the summary counts the flips that replay (j = 0 scores as the target's record,
j = k as the method's), the culprit's place, its kind and, for a head, its P(important) rank among the
response's swaps. Writes ``<out>.json`` (every response's swaps and scores), ``<out>.md`` and ``<out>.png`` (per
method, every flipped response's swaps coloured by their continuation's score).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import run_facts  # noqa: E402
from judge_audit import kind  # noqa: E402

from selfjudge.features import FeatureSpec, forward_with_hidden, judge_features, scalar_features  # noqa: E402
from selfjudge.autojudge import continue_greedy  # noqa: E402
from selfjudge.io import write_json  # noqa: E402
from selfjudge.models import format_prompt  # noqa: E402
from selfjudge.policies import load_head  # noqa: E402
from selfjudge.tasks import build_task, example_system_prompt  # noqa: E402

RULE_SCALARS = ["target_top1_logp", "target_gap", "kl"]


def read_records(where: str) -> tuple[list[dict], dict]:
    """(records, eval key) of an eval folder (``per_example.jsonl``, rank files of a run still decoding, and
    ``eval_key.json``) or of committed records (``<prefix>.per_example.jsonl.gz`` and ``<prefix>.eval_key.json``)."""
    d = Path(where)
    if d.is_dir():
        files, key = [d / "per_example.jsonl", *sorted(d.glob("per_example.rank*.jsonl"))], d / "eval_key.json"
    else:
        files, key = [Path(f"{where}.per_example.jsonl.gz")], Path(f"{where}.eval_key.json")
    for p in (files[0], key):
        if not p.is_file():
            raise SystemExit(
                f"flip_trace: no {p} (pass an eval folder, or the prefix of committed records, e.g. "
                f"docs/bench/evidence_val_gsm8k_g8_b64)"
            )
    lines = []
    for f in files:
        with gzip.open(f, "rt") if f.suffix == ".gz" else open(f) as fh:
            lines += [line for line in fh.read().split("\n") if line.strip()]
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a file a running eval is appending to
            continue
    return out, json.loads(key.read_text())


def parse_method(s: str) -> tuple[str, float | None]:
    name, _, thr = s.partition("@")
    try:
        return name, (float(thr) if thr else None)
    except ValueError:
        raise SystemExit(f"flip_trace: --method '{s}' must read NAME@THRESHOLD (e.g. kl@0.5)") from None


def flipped(records: list[dict], method: str, threshold: float | None, which: str) -> list[tuple[dict, dict]]:
    """(target record, method record) of every prompt whose score the method changed (``which``: rw = right to
    wrong, wr = wrong to right, both)."""
    base = {r["prompt_id"]: r for r in records if r["method"] == "target"}
    mine = [
        r
        for r in records
        if r["method"] == method
        and (
            threshold is None
            or (r["threshold"] is not None and abs(r["threshold"] - threshold) <= 1e-9 * max(1.0, threshold))
        )
    ]
    if not mine:
        have = sorted({(r["method"], r["threshold"]) for r in records}, key=str)
        raise SystemExit(f"flip_trace: no records of --method {method}@{threshold}; the file holds {have}")
    out = []
    for r in mine:
        b = base.get(r["prompt_id"])
        if b is None or b["score"] == r["score"]:
            continue
        if which == "both" or (which == "rw") == (b["score"] > r["score"]):
            out.append((b, r))
    return out


@torch.no_grad()
def swaps_of(pair, prompt: list[int], response: list[int], head=None) -> list[dict]:
    """Every token of ``response`` that is not the target's argmax after its own prefix, with the rule
    quantities at it and (``head``) the head's P(important) from the features the verify pass reads."""
    spec = FeatureSpec.from_mapping(head.config.features) if head is not None else FeatureSpec()
    if spec.include_draft:
        raise SystemExit("flip_trace: heads that read the draft's state (features.include_draft) are not traced")
    dev = next(pair.target.parameters()).device
    ids = torch.tensor([prompt + response], device=dev)
    out = forward_with_hidden(pair.target, ids, spec)
    P, T = len(prompt), len(response)
    logits = out.logits[0, P - 1 : P + T - 1]  # [T, V]: position s predicts response[s]
    tok = ids[0, P : P + T]
    wrong = (logits.argmax(-1) != tok).nonzero()[:, 0].tolist()
    if not wrong:
        return []
    idx = torch.tensor(wrong, device=dev)
    draft_logits = forward_with_hidden(pair.draft, ids).logits[0, P - 1 : P + T - 1][idx]  # KL(q||p) at each swap
    V = min(logits.shape[-1], draft_logits.shape[-1])  # padded vocabularies: the ids both models index
    tl, dl = logits[idx][..., :V], draft_logits[..., :V]
    rules = scalar_features(RULE_SCALARS, tl, tok[idx], dl)
    p = None
    if head is not None:
        sc = scalar_features(spec.scalars, tl, tok[idx], dl)
        feats = judge_features(
            out.hidden[0, P : P + T][idx],
            spec,
            prev_hidden=out.hidden[0, P - 1 : P + T - 1][idx],
            scalars=sc if spec.scalars else None,
        )
        p = head.predict_proba(feats.to(next(head.parameters()).device)).float().cpu().tolist()
    dec = pair.tokenizer.decode
    rows = []
    for j, s in enumerate(wrong):
        target_tok = int(logits[s].argmax())
        rows.append(
            {
                "position": s,
                "target": dec([target_tok]),
                "draft": dec([response[s]]),
                "kind": kind(dec([target_tok]), dec([response[s]])),
                "target_top1_p": float(rules[j, 0].exp()),
                "gap": float(rules[j, 1]),
                "kl": float(rules[j, 2]),
                "p_important": None if p is None else float(p[j]),
            }
        )
    return rows


@torch.no_grad()
def continue_all(pair, jobs: list[tuple[list[int], list[int], int]], batch_size: int) -> list[list[int]]:
    """For each (prompt, response prefix, budget): the prefix followed by the target's greedy continuation,
    at most ``budget`` response tokens in all (a prefix that ends with EOS is its own answer)."""
    caps = [0 if (r and r[-1] in pair.eos_ids) else max(0, budget - len(r)) for _, r, budget in jobs]
    cont = continue_greedy(pair, [x + r for x, r, _ in jobs], caps, batch_size, "--batch-size")
    return [r + c for (_, r, _), c in zip(jobs, cont)]


def probes(scores: list[float | None], scan: str) -> list[int]:
    """The continuations still to make: every j (``scan=all``), or the next step of a bisection between j = 0
    and j = k (``bisect``: about log2(k) rounds; the swap it ends on flips the continuation where the one before
    does not, the first such swap when the flip stays, as it does in most responses)."""
    k = len(scores) - 1
    if scan == "all":
        return [j for j in range(k + 1) if scores[j] is None]
    if scores[0] is None or scores[k] is None:
        return [j for j in (0, k) if scores[j] is None]
    lo, hi = 0, k
    if scores[k] == scores[0]:
        return []
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if scores[mid] is None:
            return [mid]
        lo, hi = (mid, hi) if scores[mid] == scores[0] else (lo, mid)
    return []


def culprit(scores: list[float | None], scan: str) -> int | None:
    """The swap that turned the answer: the first j >= 1 scoring otherwise than j = 0 (``all``), or where the
    bisection ended (None: the last swap's continuation scores as j = 0, so no flip replays)."""
    k = len(scores) - 1
    if k < 1 or scores[k] == scores[0]:
        return None if scan == "bisect" else next((j for j in range(1, k + 1) if scores[j] != scores[0]), None)
    if scan == "all":
        return next(j for j in range(1, k + 1) if scores[j] != scores[0])
    lo, hi = 0, k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if scores[mid] == scores[0] else (lo, mid)
    return hi


def summarize(traces: list[dict]) -> dict:
    """Per method: flips, those that replay, where the culprit sits, its kind and its head rank."""
    n = len(traces)
    replay = [t for t in traces if t["scores"][0] == t["target_score"] and t["scores"][-1] == t["method_score"]]
    found = [t for t in traces if t["culprit"] is not None]
    first = [t for t in found if t["culprit"] == 1]
    sticky = [t for t in found if all(s == t["scores"][t["culprit"]] for s in t["scores"][t["culprit"] :])]
    full = all(None not in t["scores"] for t in traces)  # "stays flipped" needs every continuation (--scan all)
    ranks = []  # the culprit's P(important) rank among its response's swaps: 0 lowest (accepted first), 1 highest
    for t in found:
        ps = [s["p_important"] for s in t["swaps"]]
        if None in ps or len(ps) < 2:
            continue
        c = ps[t["culprit"] - 1]
        ranks.append(sum(p < c for p in ps) / (len(ps) - 1))
    kinds = {
        k: sum(t["swaps"][t["culprit"] - 1]["kind"] == k for t in found) for k in ("number", "punctuation", "word")
    }
    everyk = [s["kind"] for t in traces for s in t["swaps"]]
    return {
        "flips": n,
        "replayed": len(replay),
        "with_culprit": len(found),
        "culprit_first_swap": len(first),
        "culprit_index_median": statistics.median([t["culprit"] for t in found]) if found else None,
        "culprit_relative_median": statistics.median([t["culprit"] / len(t["swaps"]) for t in found])
        if found
        else None,
        "swaps_median": statistics.median([len(t["swaps"]) for t in traces]) if traces else None,
        "sticky": len(sticky) if full else None,
        "culprit_kinds": kinds,
        "swap_kinds": {k: everyk.count(k) for k in ("number", "punctuation", "word")},
        "culprit_p_rank_mean": statistics.fmean(ranks) if ranks else None,
        "culprit_top1_p_mean": statistics.fmean(t["swaps"][t["culprit"] - 1]["target_top1_p"] for t in found)
        if found
        else None,
        "swap_top1_p_mean": statistics.fmean(s["target_top1_p"] for t in traces for s in t["swaps"])
        if everyk
        else None,
    }


def table(res: dict) -> str:
    rows = [
        "| method | flips | replay | culprit found | culprit is the 1st swap | culprit swap index (median) "
        "| swaps per response (median) | stays flipped after it | culprit kinds (num/punct/word) | all swaps' kinds "
        "| culprit's P rank (0 = accepted first) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for name, s in res["methods"].items():
        ck, ak = s["culprit_kinds"], s["swap_kinds"]
        rank = "-" if s["culprit_p_rank_mean"] is None else f"{s['culprit_p_rank_mean']:.2f}"
        rows.append(
            f"| {name} ({s['direction']}) | {s['flips']} | {s['replayed']} | {s['with_culprit']} | {s['culprit_first_swap']} "
            f"| {s['culprit_index_median']} | {s['swaps_median']} | {'-' if s['sticky'] is None else s['sticky']} "
            f"| {ck['number']}/{ck['punctuation']}/{ck['word']} | {ak['number']}/{ak['punctuation']}/{ak['word']} | {rank} |"
        )
    return "\n".join(rows)


def plot(traces: dict[str, list[dict]], path: str) -> None:
    """One panel per method, one row per flipped response: its swaps in order, each coloured by how the greedy
    continuation after it scores (green as the target's own response, red as the method's, grey not made),
    the culprit ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(traces))
    height = max(2.5, 0.28 * max((len(ts) for ts in traces.values()), default=1) + 1.2)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, height), squeeze=False)
    for ax, (label, ts) in zip(axes[0], traces.items()):
        for row, t in enumerate(ts):
            sc = t["scores"]
            for j in range(1, len(sc)):
                c = "0.8" if sc[j] is None else ("tab:green" if sc[j] == sc[0] else "tab:red")
                ax.scatter(j, row, s=28, color=c, zorder=2)
            if t["culprit"] is not None:
                ax.scatter(t["culprit"], row, s=110, facecolors="none", edgecolors="black", zorder=3)
        ax.set_yticks(range(len(ts)), [t["prompt_id"].rsplit("/", 1)[-1] for t in ts], fontsize=7)
        ax.set_xlabel("accepted swap j (continuation after it)")
        name, _, thr = label.partition("@")
        ax.set_title(f"{name} @ {float(thr):.3g}" if thr not in ("", "None") else name, fontsize=9)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(
        "Greedy continuation after swap j: green = the target's answer, red = the flipped one; ringed = culprit",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def examples_md(traces: list[dict], pair, n: int) -> list[str]:
    out = []
    for t in [t for t in traces if t["culprit"] is not None][:n]:
        s = t["swaps"][t["culprit"] - 1]
        ctx = pair.tokenizer.decode(t["output_ids"][max(0, s["position"] - 12) : s["position"]])
        p = "" if s["p_important"] is None else f" P={s['p_important']:.2g}"
        out.append(
            f"- {t['prompt_id']}: swap {t['culprit']} of {len(t['swaps'])}{p} top1={s['target_top1_p']:.2f} "
            f"`{ctx!r}` | `{s['target']!r}` -> `{s['draft']!r}` | scores {t['scores']}"
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "records", help="an eval folder, or the prefix of committed records (<prefix>.per_example.jsonl.gz)"
    )
    ap.add_argument("--method", action="append", required=True, help="NAME@THRESHOLD (repeat)")
    ap.add_argument("--head", action="append", default=[], help="NAME=FOLDER: the head a judge method decoded with")
    ap.add_argument(
        "--direction", choices=("rw", "wr", "both"), default="rw", help="right to wrong (default), wrong to right"
    )
    ap.add_argument("--gsm8k-dir", default=None, help="a local GSM8K copy (the records' dataset.path otherwise)")
    ap.add_argument("--max-responses", type=int, default=None, help="at most this many flips per method")
    ap.add_argument("--batch-size", type=int, default=64, help="continuations per greedy batch")
    ap.add_argument(
        "--scan", choices=("bisect", "all"), default="bisect", help="continuations: a bisection (default) or all"
    )
    ap.add_argument("--examples", type=int, default=6)
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    ap.add_argument("--config-module", default="selfjudge.conf", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from selfjudge.models import pair_from_mapping

    records, key = read_records(args.records)
    methods = [parse_method(m) for m in args.method]
    heads = dict(h.split("=", 1) for h in args.head)
    plan = {}
    for name, thr in methods:
        fl = flipped(records, name, thr, args.direction)
        plan[f"{name}@{thr}"] = (name, fl[: args.max_responses] if args.max_responses else fl)
    ds = dict(key["dataset"])
    if args.gsm8k_dir and ds.get("name") == "gsm8k":
        ds["path"] = args.gsm8k_dir
    ids = sorted({b["prompt_id"] for _, fl in plan.values() for b, _ in fl})
    print(f"flip_trace: {', '.join(f'{k}: {len(v[1])}' for k, v in plan.items())} flipped responses ({args.direction})")
    with initialize_config_module(args.config_module, version_base="1.3"):
        cfg = compose("selfjudge", overrides=["logger=none", *overrides])
    pair = pair_from_mapping(OmegaConf.to_container(cfg, resolve=True)["model"])
    dev = next(pair.target.parameters()).device
    loaded = {
        n: load_head(
            f,
            pair.target_info.as_dict(),
            pair.target_info.hidden_size,
            pair.draft_info.hidden_size,
            dev,
            key=f"--head {n}",
        )
        for n, f in heads.items()
    }
    task = build_task(ds)  # the eval's own slice, so every example is the one it decoded
    if not task.has_checker:
        raise SystemExit(f"flip_trace: the records' task '{ds.get('name')}' has no answer checker: nothing can flip")
    examples = {ex.id: ex for ex in task.examples()} if ids else {}
    if set(ids) - set(examples):
        raise SystemExit(
            f"flip_trace: the records' dataset slice no longer holds {sorted(set(ids) - set(examples))[:3]}"
        )
    budget = int(key["settings"]["max_new_tokens"])
    t0 = time.perf_counter()
    traces: dict[str, list[dict]] = {}
    for label, (name, fl) in plan.items():
        traces[label] = []
        for b, r in fl:
            ex = examples[r["prompt_id"]]
            prompt = format_prompt(pair.tokenizer, ex.prompt, example_system_prompt(task, ex), task.chat_template)
            if len(prompt) != r["prompt_tokens"]:
                raise SystemExit(
                    f"flip_trace: {ex.id}'s prompt has {len(prompt)} tokens here, {r['prompt_tokens']} in the records "
                    f"(another tokenizer or prompt format than the eval's)"
                )
            sw = swaps_of(pair, prompt, r["output_ids"], loaded.get(name))
            traces[label].append(
                {
                    "prompt_id": ex.id,
                    "target_score": b["score"],
                    "method_score": r["score"],
                    "accepted_by_rule": r["accepted_by_rule"],
                    "output_ids": r["output_ids"],
                    "swaps": sw,
                    "scores": [None] * (len(sw) + 1),
                    "_prompt": prompt,
                    "_example": ex,
                }
            )
    print(f"flip_trace: teacher-forced passes {time.perf_counter() - t0:.0f} s", flush=True)
    made = 0
    while True:  # rounds of continuations, every response's next probes batched together
        todo = [(t, j) for ts in traces.values() for t in ts for j in probes(t["scores"], args.scan)]
        if not todo:
            break
        jobs = []
        for t, j in todo:
            y, sw = t["output_ids"], t["swaps"]
            cut = (sw[0]["position"] if sw else len(y)) if j == 0 else sw[j - 1]["position"] + 1
            jobs.append((t["_prompt"], y[:cut], budget))
        for (t, j), o in zip(todo, continue_all(pair, jobs, args.batch_size)):
            score = task.score(t["_example"], pair.tokenizer.decode(o, skip_special_tokens=True))
            if score is None:  # a checker that cannot score this example: its record would have no score either
                raise SystemExit(f"flip_trace: the checker gives {t['prompt_id']} no score")
            t["scores"][j] = score
        made += len(todo)
        print(f"  {made} continuations ({time.perf_counter() - t0:.0f} s)", flush=True)
    for ts in traces.values():
        for t in ts:
            t["culprit"] = culprit(t["scores"], args.scan)
            del t["_prompt"], t["_example"]
    res = {
        "records": args.records,
        "direction": args.direction,
        "scan": args.scan,
        "continuations": made,
        "methods": {k: {"direction": args.direction, **summarize(v)} for k, v in traces.items()},
        "seconds": time.perf_counter() - t0,
        "run": run_facts(pair),
        "overrides": overrides,
        "traces": traces,
    }
    md = [table(res), ""]
    for label, ts in traces.items():
        md += [
            f"**{label}**, culprit swaps in context (target -> accepted; continuation scores j = 0..k, null where not made):",
            "",
        ]
        md += examples_md(ts, pair, args.examples) + [""]
    print("\n".join(md))
    if args.out:  # the token ids stay in the records file
        slim = {k: [{x: v for x, v in t.items() if x != "output_ids"} for t in ts] for k, ts in traces.items()}
        write_json(f"{args.out}.json", {**res, "traces": slim})
        Path(f"{args.out}.md").write_text("\n".join(md) + "\n")
        plot(traces, f"{args.out}.png")
    return res


if __name__ == "__main__":
    main()
