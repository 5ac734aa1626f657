"""eval stage: every method on the same prompts in one process, models loaded once.

For each prompt, all methods run back to back (target-only first), so slow drifts of machine load hit
every method alike. Records are appended to per_example.jsonl as they finish: a rerun skips what is
there. summary.json, report.md and pareto.png are written at the end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from selfjudge.decoding import decode
from selfjudge.features import FeatureSpec
from selfjudge.io import check_writable, code_version, write_json
from selfjudge.metrics import agreement, aggregate
from selfjudge.models import format_prompt, pair_from_mapping
from selfjudge.policies import POLICIES, build_policy, load_head
from selfjudge.report import write_report
from selfjudge.tasks import build_task, example_system_prompt


def method_grid(methods: dict[str, Any], heads: dict) -> list[tuple[str, Any]]:
    """(policy, threshold) pairs: target-only and lossless first, then each rule's sweep."""
    grid: list[tuple[str, Any]] = [("target", None), ("lossless", None)]
    for name, ths in (methods or {}).items():
        if name not in POLICIES or name in ("lossless",):
            raise ValueError(f"unknown policy '{name}' in eval.methods; known: {[p for p in POLICIES if p != 'lossless']}")
        if name in ("judge", "autojudge") and name not in heads:
            continue  # no head folder configured for it
        if ths == "head_quantiles":
            if name not in heads:
                raise ValueError(f"eval.methods.{name}=head_quantiles needs a head")
            ths = heads[name].config.thresholds.get("quantiles") or []
        if isinstance(ths, (int, float)):
            ths = [ths]
        for t in ths:
            build_policy(name, t, heads)  # validates the threshold now, before any decoding
            grid.append((name, float(t)))
    return grid


def _done_keys(path: Path) -> set[tuple]:
    if not path.is_file():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill: that record is simply redone
        keys.add((r["method"], r["threshold"], r["prompt_id"]))
    return keys


def run(cfg: DictConfig) -> dict[str, Any]:
    plain = OmegaConf.to_container(cfg, resolve=True)
    e = plain["eval"]
    gamma = int(e["gamma"])
    if gamma < 1:
        raise ValueError(f"eval.gamma must be >= 1, got {gamma}")
    out_dir = check_writable(e["output_dir"], "eval.output_dir")
    task = build_task(e["dataset"])
    examples = task.examples()
    pair = pair_from_mapping(plain["model"])
    tinfo = pair.target_info.as_dict()
    dim = lambda spec: spec.dim(pair.target_info.hidden_size, pair.draft_info.hidden_size)  # noqa: E731
    heads = {}
    methods = dict(e["methods"] or {})
    if "judge" in methods and e.get("judge_dir"):
        heads["judge"] = load_head(e["judge_dir"], tinfo, dim)
    if e.get("autojudge_dir"):
        heads["autojudge"] = load_head(e["autojudge_dir"], tinfo, dim)
        methods.setdefault("autojudge", methods.get("judge", "head_quantiles"))
    grid = method_grid(methods, heads)
    gen = torch.Generator(device=next(pair.target.parameters()).device).manual_seed(int(e["seed"]))
    prompts = [format_prompt(pair.tokenizer, ex.prompt, example_system_prompt(task, ex), task.chat_template)
               for ex in examples]
    specs = {m: FeatureSpec.from_mapping(h.config.features) for m, h in heads.items()}

    def run_one(method: str, th: Any, ids: list[int]):
        policy = None if method in ("target", "lossless") else build_policy(method, th, heads)
        return decode(pair.target, pair.draft, ids, gamma=0 if method == "target" else gamma,
                      max_new_tokens=int(e["max_new_tokens"]), eos_ids=pair.eos_ids, vocab=pair.vocab_size,
                      policy=policy, temperature=float(e["temperature"]), generator=gen,
                      feature_spec=specs.get(method, FeatureSpec()))

    for ids in prompts[: int(e["warmup"])]:  # warm-up, excluded from every timing
        for m, th in {(m, None if m in ("target", "lossless") else th) for m, th in grid[:3]}:
            run_one(m, th, ids)
    per_path = out_dir / "per_example.jsonl"
    done = _done_keys(per_path)
    total = len(examples) * len(grid)
    bar = tqdm(total=total, initial=len(done), desc="eval", unit="decode")
    with open(per_path, "a", encoding="utf-8") as f:
        for ex, ids in zip(examples, prompts):
            reference_ids: list[int] | None = None
            for method, th in grid:
                if (method, th, ex.id) in done:
                    continue
                toks, st = run_one(method, th, ids)
                text = pair.tokenizer.decode(toks, skip_special_tokens=True)
                score = task.score(ex, text)
                if method == "target":
                    reference_ids = toks
                if score is None and not task.has_checker or (task.name == "mix" and score is None):
                    if reference_ids is None:  # resumed after target-only: read it back
                        reference_ids = next(json.loads(line)["output_ids"] for line in per_path.read_text().splitlines()
                                             if json.loads(line)["prompt_id"] == ex.id and json.loads(line)["method"] == "target")
                    score = agreement(toks, reference_ids)
                rec = {"prompt_id": ex.id, "task": ex.task, "method": method, "threshold": th, "output_ids": toks,
                       "text": text, "score": score, "rounds": st.target_forwards, "new_tokens": st.new_tokens,
                       "target_forwards": st.target_forwards, "draft_forwards": st.draft_forwards,
                       "proposed": st.proposed, "accepted": st.accepted, "accept_hist": st.accept_hist,
                       "seconds": st.seconds}
                f.write(json.dumps(rec) + "\n")
                f.flush()
                bar.update(1)
    bar.close()
    records = [json.loads(line) for line in per_path.read_text().splitlines() if line.strip()]
    base = aggregate(r for r in records if r["method"] == "target")
    rows = []
    for method, th in grid:
        agg = aggregate((r for r in records if r["method"] == method and r["threshold"] == th), base["tokens_per_s"])
        rows.append({"method": method, "threshold": th, **agg})
    title = (f"{task.name}: {len(examples)} prompts, gamma={gamma}, max_new_tokens={e['max_new_tokens']}, "
             f"T={e['temperature']}, target {pair.target_info.name}, draft {pair.draft_info.name}")
    summary = {"title": title, "task": task.name, "gamma": gamma, "rows": rows, "code_version": code_version(),
               "target_model": tinfo, "draft_model": pair.draft_info.as_dict(), "config": plain["eval"]}
    write_json(out_dir / "summary.json", summary)
    text = write_report(rows, out_dir, title)
    if plain["logger"]["name"] == "wandb":
        _log_wandb(plain, rows)
    print(text)
    best = {m: max((r for r in rows if r["method"] == m), key=lambda r: r["speedup"] or 0) for m in {r["method"] for r in rows}}
    return {"rows": len(rows), "best_speedup": {m: r["speedup"] for m, r in best.items()}}


def _log_wandb(plain: dict, rows: list[dict]) -> None:
    import wandb

    lg = plain["logger"]
    run = wandb.init(project=lg["project"], entity=lg["entity"], mode=lg["mode"], tags=list(lg["tags"]) + ["eval"],
                     config=plain, dir=plain["run_dir"], job_type="eval")
    cols = ["method", "threshold", "accuracy", "mean_accepted_length", "acceptance_rate", "tokens_per_s", "speedup"]
    run.log({"eval/results": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])})
    run.finish()
