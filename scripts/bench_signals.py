"""Signal study: which score predicts a harmful draft substitution? (issue 12, item 1)

Reads data_gen folders (one per domain) whose features hold the superset layout the study slices,
e.g. ``data_gen.features.layers=[14,-1] data_gen.features.state_offsets=[-1,0]
data_gen.features.include_draft=true data_gen.features.scalars=[<all of selfjudge.features.SCALARS>]``,
with AutoJudge labels (``data_gen.autojudge.enabled=true data_gen.autojudge.mode=independent``).
For every mismatch (substituted rows only: the rules act on mismatches alone) and two labels,

- ``selfjudge``: LD_N > τ (the folder's τ), and
- ``answer``: the AutoJudge label (greedy continuation after the swap changes the task score; rows
  without one are left out of that label's columns), and
- ``harm``: the answer label where the swap turns a right answer wrong (1), every other answer-labelled row 0:
  the task score is correctness, so ``answer`` also counts swaps that turn a wrong answer right, which an
  accuracy-keeping rule may accept (the response's own score: its text scored by the task's checker),

it reports ROC-AUC and PR-AUC with prompt-clustered bootstrap 95 % intervals for: the training-free
scores (KL(q‖p); the KL rule, which also rejects where the target's top-1 p > 0.9; the likelihood gap;
−log p(d); the typical-acceptance criterion; top-k rank; the draft's −log q(d)), LD itself, and the
judge's P(important) for each feature set and head. Every score is oriented so that higher means
"important" (reject). The typical score is −ε*, the largest ε at which typical acceptance
(p(d) > min(ε, √ε·e^−H)) still accepts d: ε* = p(d) if p(d) <= e^−2H, else (p(d)·e^H)².
Harm curves (``<out>.png``; a table for the answer label): the share of the accepted mismatches that
carry a label, accepting the safest first by each score, for the rules and the head per train label
with the best validation AUC. A ranking, not a decode: eval's rows decide.

Heads (logistic, MLP, and an LD regressor read as P = Φ((pred − τ)/σ), σ the training residual std)
are trained on ``--train`` folders when given, else cross-fitted on the held-out folder itself
(``--folds`` prompt-level folds: each row is scored by a head that never saw its prompt). Heads train on
substituted rows only: with the scalar features an original-token row (gap 0) is trivially label 0.
"Validation" AUC is on 20 % of each training side's prompts (epoch selection); "held-out" is out of fold.

    python scripts/bench_signals.py --data gsm8k=runs/sig_gsm8k/data mmlu=runs/sig_mmlu/data \\
        --out docs/bench/signals_real

``--path own|carried`` keeps the rows of the prompts' own responses, or of the responses an AutoJudge search
went on along after a kept swap (``data_gen.autojudge.mode=carry``: swaps off the target's path, where a decode
that accepts swaps spends most of its time).

Answer-change labels are the costly part (a greedy continuation each), so they accumulate across runs
and machines: ``--dump`` writes every mismatch's labels and rule scores (no features) with its key
(prompt, response hash, position, draft token); ``--rows`` reads such files back. Their labels fill
this run's mismatches with the same key (so a cheap data_gen without ``autojudge`` over the same prompts
gets the heads its labels back wherever the target wrote the same response), and their rows of other
prompts join a pooled table of the training-free scores. Labels scored by another revision of the task's
answer checker than today's (``selfjudge.tasks.answers.CHECKER_REVISIONS``; a folder's manifest names the
revision it was made with, a dump row its ``checker``) are left out and counted as dropped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from selfjudge.autojudge import label_key
from selfjudge.features import FeatureSpec
from selfjudge.judge import JudgeConfig, JudgeHead
from selfjudge.judge_metrics import accepted_harm
from selfjudge.shards import open_dataset
from selfjudge.tasks import build_task

LABELS = ("selfjudge", "answer", "harm")
RULE_SCORES = ("kl", "kl_rule", "likelihood_gap", "neg_logp", "typical", "topk_rank", "draft_neg_logq", "ld")
HEADS = ("logistic", "mlp", "ld_reg")
ROW_KEYS = ("x", "sj", "aj", "base", "ld", "prompt", "key", "finished", "carried")  # per-row arrays of a domain
PATHS = ("all", "own", "carried")
SHARES = tuple(round(0.05 * k, 2) for k in range(1, 21))  # acceptance shares of the harm curves
# feature sets: a name -> the FeatureSpec mapping a head trained on it would carry (sliced from the folder)
FEATURE_SETS = {
    "h_i": {"layers": [-1], "state_offsets": [0]},  # the paper's feature
    "h_i-1": {"layers": [-1], "state_offsets": [-1]},
    "h_i-1,h_i": {"layers": [-1], "state_offsets": [-1, 0]},
    "scalars": {"layers": [-1], "state_offsets": [], "scalars": "all"},
    "h_i+scalars": {"layers": [-1], "state_offsets": [0], "scalars": "all"},
    "h_i-1,h_i+scalars": {"layers": [-1], "state_offsets": [-1, 0], "scalars": "all"},
    # the set within the 2 % cost budget: states + the likelihood scalars (a max and a logsumexp); the default
    "h_i-1,h_i+lik": {
        "layers": [-1],
        "state_offsets": [-1, 0],
        "scalars": ["target_logp", "target_top1_logp", "target_gap"],
    },
    "2layers,h_i-1,h_i+scalars": {"layers": "all", "state_offsets": [-1, 0], "scalars": "all"},
    "all+draft": {"layers": "all", "state_offsets": [-1, 0], "include_draft": True, "scalars": "all"},
}


# ------------------------------------------------------------------ data
def load_folder(folder: str, partial: bool = False) -> dict:
    """Substituted rows of one data_gen folder: features [N, D], labels, LD, prompt ids, the layout.
    ``partial``: also a folder still being made (the shards written so far; τ must be set by value)."""
    ds, man = open_dataset(folder, partial=partial)
    if man["tau"] is None:
        raise SystemExit(
            f"'{folder}' is still being made and sets τ by quantile: its SelfJudge labels are not known until "
            "it finishes (a study of a run in progress needs data_gen.tau.mode=value)"
        )
    sub = np.asarray(ds.with_format("numpy", columns=["substituted"])[:]["substituted"])
    idx = np.flatnonzero(sub)
    cols = ["features", "label", "autojudge_label", "ld", "prompt_id", "position", "draft_token"]
    rows = ds.select(idx).with_format("numpy", columns=cols)[:]
    resp = ds.select(idx)["response_ids"]
    # a response cut at the length limit has no final answer: its answer-change labels (made before
    # data_gen.autojudge.finished_only) do not count. Greedy stops early only at EOS.
    finished = np.array([len(r) < int(man["max_new_tokens"]) for r in resp], dtype=bool)
    # data_gen.autojudge.mode=carry also stores rows of responses the search carried on along after a kept swap
    # (written after the prompt's own response): off the target's path
    own: dict[str, list] = {}
    carried = np.array([own.setdefault(p, r) != r for p, r in zip(rows["prompt_id"], resp)], dtype=bool)
    aj = np.asarray(rows["autojudge_label"]).astype(int)
    dropped = int(((aj >= 0) & ~finished).sum())
    aj[~finished] = -1
    # answer-change labels scored by an earlier revision of the task's checker than today's do not count
    task = build_task(man["config"]["data_gen"]["dataset"])
    checker = task.checker
    stale = int((aj >= 0).sum()) if man["config"].get("checker") != checker else 0
    if stale:
        aj[:] = -1
    spec = FeatureSpec.from_mapping(man["features"])
    H, Hd = int(man["target_model"]["hidden_size"]), man["draft_model"].get("hidden_size")
    return {
        "x": np.asarray(rows["features"], dtype=np.float32),
        "sj": (np.asarray(rows["ld"], dtype=np.float64) > float(man["tau"])).astype(int),  # = finalize's labels
        "aj": aj,
        "base": response_scores(task, man, rows["prompt_id"], resp, finished),
        "finished": finished,
        "carried": carried,
        "answer_dropped_unfinished": dropped,
        "answer_dropped_checker": stale,
        "checker": checker,
        "ld": np.asarray(rows["ld"], dtype=np.float64),
        "prompt": np.asarray(rows["prompt_id"]).astype(str),
        "key": np.array(  # the key of autojudge.label_key, shared with the labels files data_gen reads back
            [
                label_key(p, r, i, t)
                for p, r, i, t in zip(rows["prompt_id"], resp, rows["position"], rows["draft_token"])
            ]
        ),
        "spec": spec,
        "H": H,
        "Hd": Hd,
        "tau": float(man["tau"]),
        "manifest": man,
        "folder": folder,
        "complete": bool(man.get("complete")),
    }


def response_scores(task, man: dict, prompts, responses, finished: np.ndarray) -> np.ndarray:
    """Per row, the task score of its response (the target's own; 1 right, 0 wrong); NaN for a response cut at
    the limit or without a checker verdict. One decode per response."""
    out = np.full(len(prompts), np.nan)
    if not task.has_checker or not finished.any():
        return out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(man["tokenizer"]["name_or_path"])
    examples = {e.id: e for e in task.examples()}
    seen: dict[str, float] = {}
    for i in np.flatnonzero(finished):
        pid = str(prompts[i])
        if pid not in seen:
            v = (
                task.score(examples[pid], tok.decode(responses[i], skip_special_tokens=True))
                if pid in examples
                else None
            )
            seen[pid] = math.nan if v is None else float(v)
        out[i] = seen[pid]
    return out


def flips(d: dict) -> dict[str, int]:
    """Answer-labelled mismatches by their response's score: how many each way the swap flipped it."""
    aj, base = d["aj"], d["base"]
    right, wrong = (aj >= 0) & (base == 1), (aj >= 0) & (base == 0)
    return {
        "from_right": int(right.sum()),
        "right_to_wrong": int((right & (aj == 1)).sum()),
        "from_wrong": int(wrong.sum()),
        "wrong_to_right": int((wrong & (aj == 1)).sum()),
    }


def best_head(ablation: list[dict], label: str) -> str | None:
    """The score key of the head trained on ``label`` with the best validation ROC-AUC (None: no such head)."""
    best = (-1.0, None)
    for a in ablation:
        if a["train_label"] == label and not math.isnan(a["val_roc_auc"]) and a["val_roc_auc"] > best[0]:
            best = (a["val_roc_auc"], f"judge:{a['features']}:{a['head']}:{label}")
    return best[1]


def combined(scores: dict[str, np.ndarray], ablation: list[dict]) -> dict[str, np.ndarray]:
    """A combined rule per train label: the head with the best validation ROC-AUC and KL(q‖p), each as its rank
    share over the rows, averaged (``combo:<head>+kl``): a swap is rated safe when both rate it safe."""
    from scipy.stats import rankdata

    def share(v: np.ndarray) -> np.ndarray:
        out, ok = np.full(len(v), np.nan), ~np.isnan(v)
        out[ok] = rankdata(_finite(v[ok])) / max(int(ok.sum()), 1)
        return out

    heads = [h for h in (best_head(ablation, label) for label in LABELS) if h is not None and h in scores]
    kl = share(scores["rule:kl"])
    return {f"combo:{k.removeprefix('judge:')}+kl": (share(scores[k]) + kl) / 2 for k in heads}


def label_of(d: dict, label: str) -> np.ndarray:
    """A label's column (-1: unknown): ``harm`` = the answer label where the response was right, 0 where it was
    wrong (a swap there cannot cost accuracy)."""
    if label == "selfjudge":
        return d["sj"]
    if label == "answer":
        return d["aj"]
    known = (d["aj"] >= 0) & ~np.isnan(d["base"])
    return np.where(known, ((d["aj"] == 1) & (d["base"] == 1)).astype(int), -1)


def read_rows(paths: list[str]) -> list[dict]:
    """Rows of earlier ``--dump`` files (labels and rule scores per mismatch; None = +inf)."""
    import gzip

    out = []
    for path in paths:
        with gzip.open(path, "rt") as f:
            out += [json.loads(line) for line in f if line.strip()]
    return out


def answer_counts(row: dict, checker: str | None) -> bool:
    """Whether an earlier dump's answer-change label counts: a finished response (dumps older than the
    "finished" field may hold labels of cut ones) scored by the checker revision of this run's folders."""
    return bool(row.get("finished")) and row.get("checker") == checker and row["answer"] >= 0


def merge_answer_labels(d: dict, rows: list[dict]) -> int:
    """Answer-change labels of earlier runs for this run's mismatches without one (same key). Returns
    how many were taken."""
    known = {r["key"]: r["answer"] for r in rows if r.get("key") and answer_counts(r, d["checker"])}
    n = 0
    for i, k in enumerate(d["key"]):
        if d["aj"][i] < 0 and k in known:
            d["aj"][i] = known[k]
            n += 1
    return n


def pooled(d: dict, dom: str, rows: list[dict], live_scores: dict[str, np.ndarray], n_boot: int, seed: int) -> dict:
    """The training-free scores (and LD) against both labels over this run's mismatches plus the earlier
    runs' rows of prompts this run does not hold: every answer-change label ever collected counts."""
    old = [r for r in rows if r["domain"] == dom and r["prompt_id"] not in set(d["prompt"].tolist())]
    aj = [r["answer"] if answer_counts(r, d["checker"]) else -1 for r in old]
    base = [math.nan if r.get("base") is None else r["base"] for r in old]  # dumps before "base": unknown
    y = {
        label: label_of(
            {
                "sj": np.concatenate([d["sj"], [r["selfjudge"] for r in old]]).astype(int),
                "aj": np.concatenate([d["aj"], aj]).astype(int),
                "base": np.concatenate([d["base"], base]).astype(np.float64),
            },
            label,
        )
        for label in LABELS
    }
    groups = np.concatenate([d["prompt"], [r["prompt_id"] for r in old]]).astype(str)
    res: dict = {label: {} for label in LABELS}
    for k, v in live_scores.items():
        name = k.removeprefix("rule:")
        s = np.concatenate([v, [math.inf if r.get(name) is None else r[name] for r in old]]).astype(np.float64)
        for label in LABELS:
            keep = y[label] >= 0
            res[label][k] = bootstrap(y[label][keep], s[keep], groups[keep], n_boot, seed)
    return {"earlier_rows": len(old), "earlier_prompts": len({r["prompt_id"] for r in old}), "results": res}


def resolve_set(name: str, stored: FeatureSpec) -> FeatureSpec | None:
    """The FeatureSpec of a named feature set on this folder's layout (None if the folder lacks a part)."""
    m = dict(FEATURE_SETS[name])
    m["layers"] = list(stored.layers) if m["layers"] == "all" else m["layers"]
    if m.get("scalars") == "all":
        m["scalars"] = list(stored.scalars)
    spec = FeatureSpec.from_mapping(m)
    ok = (
        set(spec.layers) <= set(stored.layers)
        and set(spec.state_offsets) <= set(stored.state_offsets)
        and set(spec.scalars) <= set(stored.scalars)
        and (stored.include_draft or not spec.include_draft)
    )
    return spec if ok and (spec.scalars or not m.get("scalars")) else None


def column_index(stored: FeatureSpec, want: FeatureSpec, H: int, Hd: int | None) -> np.ndarray:
    """Indices of ``want``'s layout inside a feature vector stored with layout ``stored``."""
    cols = stored.columns(H, Hd)
    out: list[np.ndarray] = []
    for off in want.state_offsets:
        base = cols[f"state@{off}"].start
        for layer in want.layers:
            k = stored.layers.index(layer)
            out.append(np.arange(base + k * H, base + (k + 1) * H))
    if want.include_draft:
        out.append(np.arange(cols["draft"].start, cols["draft"].stop))
    out += [np.arange(cols[n].start, cols[n].stop) for n in want.scalars]
    return np.concatenate(out)


def rule_scores(d: dict) -> dict[str, np.ndarray]:
    """The training-free scores of every row from its stored scalar columns (higher = reject)."""
    cols = d["spec"].columns(d["H"], d["Hd"])
    need = ("target_logp", "target_top1_logp", "target_gap", "target_entropy", "target_log_rank", "draft_logp", "kl")
    missing = [n for n in need if n not in cols]
    if missing:
        raise ValueError(
            f"'{d['folder']}' lacks the scalar features {missing}: regenerate it with "
            f"data_gen.features.scalars listing them"
        )
    c = {n: d["x"][:, cols[n].start].astype(np.float64) for n in need}
    p, H = np.exp(c["target_logp"]), c["target_entropy"]
    eps_star = np.where(p <= np.exp(-2 * H), p, (p * np.exp(H)) ** 2)
    return {
        "kl": c["kl"],
        "kl_rule": np.where(np.exp(c["target_top1_logp"]) > 0.9, np.inf, c["kl"]),
        "likelihood_gap": c["target_gap"],
        "neg_logp": -c["target_logp"],
        "typical": -eps_star,
        "topk_rank": c["target_log_rank"],
        "draft_neg_logq": -c["draft_logp"],
        "ld": d["ld"],
    }


# ------------------------------------------------------------------ metrics
def _finite(s: np.ndarray) -> np.ndarray:
    """+inf (always rejected) -> above every finite score, so rank metrics keep the order."""
    s = s.astype(np.float64).copy()
    fin = np.isfinite(s)
    top = s[fin].max() if fin.any() else 0.0
    s[np.isposinf(s)] = top + 1.0
    return s


def auc_pair(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    if len(np.unique(y)) < 2:
        return math.nan, math.nan
    s = _finite(s)
    return float(roc_auc_score(y, s)), float(average_precision_score(y, s))


def resamples(groups: np.ndarray, n_boot: int, seed: int):
    """Row indices of ``n_boot`` resamples of whole groups (prompts) with replacement."""
    uniq, inv = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])


def paired_delta(y: np.ndarray, a: np.ndarray, b: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict:
    """ROC-AUC of score ``a`` minus that of ``b`` on the same rows, with a 95 % interval from the same prompt
    resamples for both (paired: the interval of the difference, not two overlapping ones)."""
    delta = auc_pair(y, a)[0] - auc_pair(y, b)[0]
    ds = []
    if not math.isnan(delta):
        for take in resamples(groups, n_boot, seed):
            v = auc_pair(y[take], a[take])[0] - auc_pair(y[take], b[take])[0]
            if not math.isnan(v):
                ds.append(v)
    ci = [float(np.percentile(ds, 2.5)), float(np.percentile(ds, 97.5))] if ds else [math.nan, math.nan]
    return {"delta": float(delta), "ci": ci, "n": len(y)}


def bootstrap(
    y: np.ndarray, s: np.ndarray, groups: np.ndarray, n_boot: int, seed: int, shares: tuple | None = None
) -> dict:
    """ROC-AUC / PR-AUC with 95 % intervals from resampling prompts (mismatches of one response correlate);
    with ``shares``, also the harm curve (:func:`accepted_harm`) and its pointwise intervals."""
    roc, pr = auc_pair(y, s)
    out = {"n": len(y), "positives": int(y.sum()), "roc_auc": roc, "pr_auc": pr}
    if shares is not None and len(y):
        out["accepted_harm"] = accepted_harm(y, s, shares).tolist()
    if math.isnan(roc) or n_boot <= 0:
        return {**out, "roc_ci": [math.nan, math.nan], "pr_ci": [math.nan, math.nan]}
    rs, ps, hs = [], [], []
    for take in resamples(groups, n_boot, seed):
        r, p = auc_pair(y[take], s[take])
        if not math.isnan(r):
            rs.append(r), ps.append(p)
            if shares is not None:
                hs.append(accepted_harm(y[take], s[take], shares))
    q = lambda v: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else [math.nan, math.nan]
    if hs:
        out["accepted_harm_ci"] = np.nanpercentile(np.array(hs), [2.5, 97.5], axis=0).tolist()
    return {**out, "roc_ci": q(rs), "pr_ci": q(ps)}


# ------------------------------------------------------------------ heads
def _split(prompts: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    h = np.array([int(hashlib.sha256(f"{seed}:{p}".encode()).hexdigest()[:12], 16) / 16**12 for p in prompts])
    return h < fraction


def fit_head(
    kind: str,
    x: np.ndarray,
    y: np.ndarray,
    ld: np.ndarray,
    tau: float,
    prompts: np.ndarray,
    seed: int,
    epochs: int = 30,
) -> tuple[JudgeHead, float | None, float]:
    """Train one head on (x, y) (or on LD for ``ld_reg``); epoch chosen on 20 % of the prompts.

    Returns the head, its σ (``ld_reg``) and the validation ROC-AUC at the chosen epoch."""
    val = _split(prompts, 0.2, seed)
    if val.all() or not val.any():
        val = np.arange(len(y)) % 5 == 0
    tr = ~val
    cfg = JudgeConfig(
        kind="logistic" if kind == "logistic" else "mlp",
        feature_dim=x.shape[1],
        hidden_dim=256,
        dropout=0.1 if kind != "logistic" else 0.0,
    )
    torch.manual_seed(seed)
    head = JudgeHead(cfg).init_weights(seed)
    xt = torch.from_numpy(x)
    head.set_standardization(xt[tr].mean(0), xt[tr].std(0))
    target = torch.from_numpy(ld if kind == "ld_reg" else y.astype(np.float64)).float()
    opt = torch.optim.AdamW(head.net.parameters(), lr=3e-3, weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed)
    tri = torch.from_numpy(np.flatnonzero(tr))
    best = (-1.0, None, None)
    for _ in range(epochs):
        head.train()
        for b in tri[torch.randperm(len(tri), generator=g)].split(32):  # small data: many small steps
            out = head(xt[b])
            loss = (
                torch.nn.functional.mse_loss(out, target[b])
                if kind == "ld_reg"
                else torch.nn.functional.binary_cross_entropy_with_logits(out, target[b])
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            pv = head(xt[val]).numpy()
        r, _ = auc_pair(y[val], pv)
        if math.isnan(r):  # one class on the validation side: keep the last epoch, report no AUC
            best = (math.nan, {k: v.clone() for k, v in head.state_dict().items()}, None)
        elif not r <= best[0]:
            best = (r, {k: v.clone() for k, v in head.state_dict().items()}, None)
    head.load_state_dict(best[1])
    head.eval()
    sigma = None
    if kind == "ld_reg":
        with torch.no_grad():
            sigma = float((head(xt[tr]) - target[tr]).std())
    return head, sigma, best[0]


def head_proba(kind: str, head: JudgeHead, x: np.ndarray, tau: float, sigma: float | None) -> np.ndarray:
    """P(important): sigmoid of the logit, or Φ((pred − τ)/σ) for the LD regressor."""
    with torch.no_grad():
        out = head(torch.from_numpy(x)).double()
    if kind == "ld_reg":
        return (0.5 * (1 + torch.erf((out - tau) / (sigma * math.sqrt(2))))).numpy()
    return torch.sigmoid(out).numpy()


def head_scores(
    held: dict,
    train: list[dict],
    sets: list[str],
    heads: list[str],
    labels: list[str],
    folds: int,
    seed: int,
    epochs: int,
) -> tuple[dict, list[dict]]:
    """{(set, head, train label): P(important) for every held-out row}, and the ablation rows."""
    scores, ablation = {}, []
    for name in sets:
        spec = resolve_set(name, held["spec"])
        if spec is None or any(resolve_set(name, t["spec"]) != spec for t in train):
            continue
        for label in labels:
            for kind in heads:
                if kind == "ld_reg" and label != "selfjudge":
                    continue  # the LD regressor is the SelfJudge label's head
                t0 = time.perf_counter()
                pred = np.full(len(held["sj"]), np.nan)
                vals = []
                if train:
                    parts = [(t, np.ones(len(t["sj"]), bool)) for t in train]
                    plan = [(parts, np.ones(len(held["sj"]), bool))]
                else:
                    fold = (
                        np.array(
                            [
                                int(hashlib.sha256(f"fold{seed}:{p}".encode()).hexdigest()[:8], 16)
                                for p in held["prompt"]
                            ]
                        )
                        % folds
                    )
                    plan = [([(held, fold != k)], fold == k) for k in range(folds)]
                for parts, test in plan:
                    x = np.concatenate([column_index_rows(t, spec, m) for t, m in parts])
                    y = np.concatenate([label_of(t, label)[m] for t, m in parts])
                    ld = np.concatenate([t["ld"][m] for t, m in parts])
                    pr = np.concatenate([t["prompt"][m] for t, m in parts])
                    keep = y >= 0
                    if len(np.unique(y[keep])) < 2:
                        continue
                    head, sigma, v = fit_head(kind, x[keep], y[keep], ld[keep], held["tau"], pr[keep], seed, epochs)
                    vals.append(v)
                    pred[test] = head_proba(kind, head, column_index_rows(held, spec, test), held["tau"], sigma)
                if not vals:
                    continue
                scores[(name, kind, label)] = pred
                ablation.append(
                    {
                        "features": name,
                        "spec": spec.as_dict(),
                        "head": kind,
                        "train_label": label,
                        "dim": int(spec.dim(held["H"], held["Hd"])),
                        "val_roc_auc": float(np.nanmean(vals)) if not np.isnan(vals).all() else math.nan,
                        "seconds": round(time.perf_counter() - t0, 2),
                    }
                )
    return scores, ablation


def column_index_rows(d: dict, spec: FeatureSpec, mask: np.ndarray) -> np.ndarray:
    return d["x"][mask][:, column_index(d["spec"], spec, d["H"], d["Hd"])]


# ------------------------------------------------------------------ report
def load_domain(spec: str, partial: bool = False) -> dict:
    """One domain's rows from one folder or several comma-separated folders (same layout and τ)."""
    parts = [load_folder(f, partial) for f in spec.split(",")]
    d = parts[0]
    for p in parts[1:]:
        if p["spec"] != d["spec"] or p["tau"] != d["tau"] or p["H"] != d["H"]:
            raise ValueError(
                f"'{p['folder']}' differs from '{d['folder']}' in feature layout or τ: one domain, one setup"
            )
        if p["checker"] != d["checker"]:
            raise ValueError(
                f"'{p['folder']}' and '{d['folder']}' are scored by different checkers: one domain, one task"
            )
        d["answer_dropped_unfinished"] += p["answer_dropped_unfinished"]
        d["answer_dropped_checker"] += p["answer_dropped_checker"]
        d["complete"] = d["complete"] and p["complete"]
        for k in ROW_KEYS:
            d[k] = np.concatenate([d[k], p[k]])
    d["folder"] = spec
    return d


def rows_on(d: dict, path: str) -> dict:
    """The rows of the prompts' own responses (``own``), of the responses a carried AutoJudge search went on along
    (``carried``: off the target's path), or all."""
    if path == "all":
        return d
    keep = d["carried"] == (path == "carried")
    return {**d, **{k: d[k][keep] for k in ROW_KEYS}}


def dump_rows(d: dict, scores: dict[str, np.ndarray], path: Path, domain: str) -> None:
    """Per-mismatch labels and training-free scores (no features), gzipped JSON lines: small enough to
    commit, so a later run adds its mismatches instead of starting over."""
    import gzip

    with gzip.open(path, "at") as f:
        for i in range(len(d["sj"])):
            f.write(
                json.dumps(
                    {
                        "domain": domain,
                        "prompt_id": str(d["prompt"][i]),
                        "key": str(d["key"][i]),
                        "finished": bool(d["finished"][i]),
                        "checker": d["checker"],
                        "selfjudge": int(d["sj"][i]),
                        "answer": int(d["aj"][i]),
                        "base": None if np.isnan(d["base"][i]) else float(d["base"][i]),
                        **{k: round(float(v[i]), 5) if np.isfinite(v[i]) else None for k, v in scores.items()},
                    }
                )
                + "\n"
            )


def study(
    domains: dict[str, str],
    train_dirs: list[str],
    sets: list[str],
    heads: list[str],
    folds: int,
    n_boot: int,
    seed: int,
    epochs: int,
    dump: Path | None = None,
    earlier: list[dict] | None = None,
    partial: bool = False,
    path: str = "all",
) -> dict:
    train = [load_folder(f, partial) for f in train_dirs]
    earlier = earlier or []
    out: dict = {"domains": {}, "ablation": []}
    for dom, folder in domains.items():
        d = rows_on(load_domain(folder, partial), path)
        if not len(d["sj"]):
            raise SystemExit(
                f"--path {path}: '{folder}' has no such rows (carried rows: data_gen.autojudge.mode=carry)"
            )
        merged = merge_answer_labels(d, earlier)
        scores = {f"rule:{k}": v for k, v in rule_scores(d).items()}
        if dump is not None:
            dump_rows(d, {k.removeprefix("rule:"): v for k, v in scores.items()}, dump, dom)
        hs, abl = head_scores(d, train, sets, heads, list(LABELS), folds, seed, epochs)
        for (name, kind, lab), v in hs.items():
            scores[f"judge:{name}:{kind}:{lab}"] = v
        scores.update(combined(scores, abl))
        res = {}
        for label in LABELS:
            y = label_of(d, label)
            keep = y >= 0
            res[label] = {}
            for k, v in scores.items():  # NaN: rows a head could not score (its training folds had one class)
                m = keep & ~np.isnan(v)
                res[label][k] = bootstrap(y[m].astype(int), v[m], d["prompt"][m], n_boot, seed, SHARES)
        deltas = []  # per label, the best head of each train label (by validation AUC) against every rule
        best = [h for h in (best_head(abl, lab) for lab in LABELS) if h is not None]
        for label in LABELS:
            y = label_of(d, label)
            # and LD itself, the score every SelfJudge head learns (its own label: trivial there)
            for head in [*best, *(["rule:ld"] if label != "selfjudge" else [])]:
                m = (y >= 0) & ~np.isnan(scores[head])
                if len(np.unique(y[m])) < 2:
                    continue
                vs = {
                    k: paired_delta(y[m], scores[head][m], scores[k][m], d["prompt"][m], n_boot, seed)
                    for k in scores
                    if k.startswith("rule:") and k != "rule:ld"
                }
                deltas.append({"label": label, "head": head, "vs": vs})
        for a in abl:
            a["domain"] = dom
            for label in LABELS:
                a[f"heldout_roc_auc_{label}"] = res[label][f"judge:{a['features']}:{a['head']}:{a['train_label']}"][
                    "roc_auc"
                ]
        out["domains"][dom] = {
            "folder": folder,
            "complete": d["complete"],
            "tau": d["tau"],
            "mismatches": len(d["sj"]),
            "path": path,
            "carried_rows": int(d["carried"].sum()),
            "answer_labelled": int((d["aj"] >= 0).sum()),
            "answer_flips": flips(d),
            "prompts": len(np.unique(d["prompt"])),
            "answer_labels_from_earlier_rows": merged,
            "answer_labels_dropped_unfinished": d["answer_dropped_unfinished"],
            "answer_labels_dropped_checker": d["answer_dropped_checker"],
            "results": res,
            "paired": deltas,
        }
        if earlier:
            out["domains"][dom]["pooled"] = pooled(
                d, dom, earlier, {k: v for k, v in scores.items() if k.startswith("rule:")}, n_boot, seed
            )
        out["ablation"] += abl
    return out


def _fmt(r: dict, key: str) -> str:
    v, ci = r[key], r[key.replace("_auc", "_ci")]
    return "–" if math.isnan(v) else f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


TITLES = {"selfjudge": "SelfJudge", "answer": "answer-change", "harm": "right-to-wrong"}


def score_table(results: dict) -> list[str]:
    """One row per score: ROC-AUC and PR-AUC with intervals and counts, against each label."""
    labels = [lab for lab in LABELS if lab in results]
    lines = [
        "| score | " + " | ".join(f"{TITLES[lab]} ROC-AUC | PR-AUC | n (pos)" for lab in labels) + " |",
        "|---|" + "---|---|---|" * len(labels),
    ]
    for k in results["selfjudge"]:
        cells = [
            f"{_fmt(r[k], 'roc_auc')} | {_fmt(r[k], 'pr_auc')} | {r[k]['n']} ({r[k]['positives']})"
            for r in (results[lab] for lab in labels)
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return [*lines, ""]


PLOTTED_RULES = ("rule:kl", "rule:likelihood_gap", "rule:typical", "rule:topk_rank", "rule:ld")


def curve_scores(res: dict, dom: str) -> list[str]:
    """The scores a domain's harm curves show: the rules, and per train label the head with the best
    validation ROC-AUC (picked on validation, not on the held-out rows the curves are drawn from)."""
    mine = [a for a in res["ablation"] if a["domain"] == dom]
    heads = [h for h in (best_head(mine, label) for label in LABELS) if h is not None]
    combos = [k for k in res["domains"][dom]["results"]["selfjudge"] if k.startswith("combo:")]
    return [*PLOTTED_RULES, *heads, *combos]


HARM_TITLES = {"answer": "change the answer", "harm": "turn a right answer wrong"}


def harm_table(dom: str, d: dict, label: str = "answer") -> list[str]:
    """The answer labels: the share of accepted mismatches that carry the label at a few acceptance shares."""
    r = d["results"].get(label, {})
    shown = [k for k, v in r.items() if "accepted_harm" in v]
    if not shown:
        return []
    at = {0.1: 1, 0.25: 4, 0.5: 9, 0.75: 14}  # indices into SHARES
    base = r[shown[0]]["accepted_harm"][-1]
    lines = [
        f"#### {dom}: share of the accepted mismatches that {HARM_TITLES[label]}, accepting the safest first by "
        f"each score [95 % prompt-bootstrap interval] (all accepted: {base:.3f}; lower is better)",
        "",
        "| score | " + " | ".join(f"{int(q * 100)} % accepted" for q in at) + " |",
        "|---|" + "---|" * len(at),
    ]
    nan = [[math.nan] * len(SHARES)] * 2

    def cell(h: list, lo: list, hi: list, i: int) -> str:
        return "–" if math.isnan(h[i]) else f"{h[i]:.3f} [{lo[i]:.3f}, {hi[i]:.3f}]"

    for k in shown:
        h, (lo, hi) = r[k]["accepted_harm"], r[k].get("accepted_harm_ci", nan)
        lines.append(f"| {k} | " + " | ".join(cell(h, lo, hi, i) for i in at.values()) + " |")
    return [*lines, ""]


def paired_table(dom: str, d: dict) -> list[str]:
    """Per label: its best head (by validation AUC), and LD, minus each rule, ROC-AUC, with paired intervals."""
    pd = d.get("paired") or []
    if not pd:
        return []
    rules = sorted({k for v in pd for k in v["vs"]})
    f = lambda r: "–" if math.isnan(r["delta"]) else f"{r['delta']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]"
    lines = [
        f"#### {dom}: ROC-AUC of the best head per train label (picked by validation AUC), and of LD, minus each "
        "rule's, per label on the same rows [95 % paired prompt-bootstrap interval]",
        "",
        "| label | head | " + " | ".join(r.removeprefix("rule:") for r in rules) + " |",
        "|---|---|" + "---|" * len(rules),
    ]
    for v in pd:
        cells = [f(v["vs"][r]) if r in v["vs"] else "–" for r in rules]
        head = v["head"].removeprefix("judge:").removeprefix("rule:")
        lines.append(f"| {TITLES[v['label']]} | {head} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def harm_plot(res: dict, path: Path) -> Path | None:
    """One panel per domain and label: the share of accepted mismatches that carry the label (harmful),
    against the share accepted, for the rules and the best head per train label (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from selfjudge.io import atomic_path

    panels = [
        (dom, lab)
        for dom, d in res["domains"].items()
        for lab in LABELS
        if any("accepted_harm" in v for v in d["results"][lab].values())
    ]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (dom, lab) in zip(axes[0], panels):
        r = res["domains"][dom]["results"][lab]
        for i, k in enumerate(k for k in curve_scores(res, dom) if "accepted_harm" in r.get(k, {})):
            style = (
                dict(ls="--", lw=1.2)
                if k.startswith("rule:")
                else dict(lw=2.2, ls=":" if k.startswith("combo:") else "-")
            )
            auc = r[k]["roc_auc"]
            ax.plot(SHARES, r[k]["accepted_harm"], color=f"C{i % 10}", label=f"{k} (ROC-AUC {auc:.2f})", **style)
            if not k.startswith("rule:") and "accepted_harm_ci" in r[k]:  # the heads' 95 % bands
                ax.fill_between(SHARES, *r[k]["accepted_harm_ci"], color=f"C{i % 10}", alpha=0.15, lw=0)
        ax.set_title(
            f"{dom}: label '{lab}' ({r['rule:kl']['n']} mismatches, {r['rule:kl']['positives']} pos)", fontsize=9
        )
        ax.set_xlabel("share of mismatches accepted (safest first by the score)")
        ax.set_ylabel(f"share of the accepted with label '{lab}'")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def markdown(res: dict) -> str:
    lines = []
    for dom, d in res["domains"].items():
        lines += [
            (
                f"### {dom}: {d['mismatches']} mismatches from {d['prompts']} prompts, "
                f"{d['answer_labelled']} with the answer-change label (τ = {d['tau']:.4g}; "
                f"{d.get('answer_labels_dropped_unfinished', 0)} labels of responses cut at the limit and "
                f"{d.get('answer_labels_dropped_checker', 0)} of an earlier checker revision left out)"
                + ("" if d.get("complete", True) else "; **data still being made: the prompts done so far**")
                + {"own": "; the prompts' own responses only", "carried": "; rows off the target's path only"}.get(
                    d.get("path", "all"), ""
                )
            ),
            "",
        ]
        fl = d.get("answer_flips")
        if fl and fl["from_right"] + fl["from_wrong"]:
            lines += [
                f"Answer-labelled swaps in responses the checker scores right: {fl['from_right']}, of which "
                f"{fl['right_to_wrong']} turn the answer wrong (the `harm` label); in responses scored wrong: "
                f"{fl['from_wrong']}, of which {fl['wrong_to_right']} turn it right (counted by `answer`, not by `harm`).",
                "",
            ]
        lines += score_table(d["results"])
        lines += paired_table(dom, d)
        lines += harm_table(dom, d, "answer") + harm_table(dom, d, "harm")
        if "pooled" in d:
            pl = d["pooled"]
            title = (
                f"#### {dom}, training-free scores over these rows and {pl['earlier_rows']} earlier rows "
                f"({pl['earlier_prompts']} other prompts)"
            )
            lines += [title, "", *score_table(pl["results"])]
    if res["ablation"]:
        lines += [
            "### Ablation (feature set × train label × head)",
            "",
            "| domain | features | dim | head | trained on | val ROC-AUC | held-out ROC-AUC vs SelfJudge | "
            "vs answer-change | vs right-to-wrong |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        f = lambda v: "–" if v is None or math.isnan(v) else f"{v:.3f}"
        for a in res["ablation"]:
            lines.append(
                f"| {a['domain']} | {a['features']} | {a['dim']} | {a['head']} | {a['train_label']} | "
                f"{f(a['val_roc_auc'])} | {f(a['heldout_roc_auc_selfjudge'])} | {f(a['heldout_roc_auc_answer'])} | "
                f"{f(a.get('heldout_roc_auc_harm'))} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="DOMAIN=FOLDER[,FOLDER...] held-out data_gen folders (several: one domain collected in chunks)",
    )
    ap.add_argument("--train", nargs="*", default=[], help="data_gen folders to train heads on (default: cross-fit)")
    ap.add_argument("--sets", nargs="*", default=list(FEATURE_SETS), help=f"feature sets, from {list(FEATURE_SETS)}")
    ap.add_argument("--heads", nargs="*", default=list(HEADS), help=f"head kinds, from {list(HEADS)}")
    ap.add_argument("--folds", type=int, default=5, help="prompt-level cross-fitting folds (no --train)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of prompts")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output path without suffix (.json, .md and .png are written)")
    ap.add_argument(
        "--dump", action="store_true", help="also write <out>.rows.jsonl.gz: labels and rule scores per mismatch"
    )
    ap.add_argument(
        "--rows",
        nargs="*",
        default=[],
        help="earlier --dump files: their answer-change labels fill this run's same mismatches, and their rows "
        "of other prompts join a pooled table of the training-free scores",
    )
    ap.add_argument(
        "--path",
        choices=PATHS,
        default="all",
        help="rows of: the prompts' own responses, the responses a carried AutoJudge search went on along "
        "(data_gen.autojudge.mode=carry: off the target's path), or all",
    )
    ap.add_argument(
        "--partial",
        action="store_true",
        help="also read data folders still being made (the shards written so far; the report says so)",
    )
    a = ap.parse_args(argv)
    bad = [s for s in a.sets if s not in FEATURE_SETS] + [h for h in a.heads if h not in HEADS]
    if bad:
        raise SystemExit(f"unknown feature set or head {bad}; sets: {list(FEATURE_SETS)}, heads: {list(HEADS)}")
    domains = {}
    for item in a.data:
        if "=" not in item:
            raise SystemExit(f"--data takes DOMAIN=FOLDER, got '{item}'")
        k, v = item.split("=", 1)
        domains[k] = v
    t0 = time.perf_counter()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dump = out.with_suffix(".rows.jsonl.gz") if a.dump else None
    earlier = read_rows(a.rows)  # before the dump is replaced: it may be one of them
    if dump is not None and dump.exists():
        dump.unlink()
    res = study(
        domains, a.train, a.sets, a.heads, a.folds, a.bootstrap, a.seed, a.epochs, dump, earlier, a.partial, a.path
    )
    res["settings"] = {
        **vars(a),
        "seconds": round(time.perf_counter() - t0, 1),
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
    }
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    harm_plot(res, out.with_suffix(".png"))
    print(md)
    return res


if __name__ == "__main__":
    main()
