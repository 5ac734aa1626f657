"""eval stage: every method on the same prompts in one process, models loaded once.

For each prompt (or batch of prompts, ``eval.batch_size`` > 1) all methods run back to back,
target-only first, so drifts of machine load hit every method alike. Records go to per_example.jsonl
as they finish; a rerun with the same settings skips what is there (a line cut by a kill is dropped
and redone). summary.json, report.md and pareto.png are written at the end, atomically; summary.json
exists only for a complete run.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from selfjudge.batch_decoding import decode_batch
from selfjudge.code_exec import isolation
from selfjudge.decoding import decode
from selfjudge.generation import fixed_batches
from selfjudge.extras import check_installed
from selfjudge.io import atomic_write_text, check_writable, code_version, config_hash, read_json, write_json
from selfjudge.judge import JudgeHead
from selfjudge.locks import stage_lock
from selfjudge.metrics import prefix_agreement, summary_rows, unique_records
from selfjudge.models import format_prompt, pair_from_mapping, resolve_model_config, runtime_line
from selfjudge.policies import POLICIES, build_policy, load_head
from selfjudge.report import write_report
from selfjudge.tasks import build_task, example_system_prompt

BASELINES = ("target", "draft", "lossless")      # method names taken by the always-run methods
HEAD_DIR_KEYS = {"judge": "judge_dir", "autojudge": "autojudge_dir"}


@dataclass(frozen=True)
class Method:
    name: str                  # key in eval.methods (or a baseline name)
    policy: str                # registry name in selfjudge.policies (target/draft: plain decoding)
    threshold: float | None    # the rule's threshold (None: no rule)
    head_key: str | None = None  # eval.* key of the head folder (judge rules)


def _check(e: dict[str, Any]) -> None:
    if not isinstance(e["gamma"], int) or e["gamma"] < 1:
        raise ValueError(f"eval.gamma must be an integer >= 1 (draft tokens per round), got {e['gamma']!r}")
    if not isinstance(e["max_new_tokens"], int) or e["max_new_tokens"] < 1:
        raise ValueError(f"eval.max_new_tokens must be an integer >= 1, got {e['max_new_tokens']!r}")
    if not isinstance(e["temperature"], (int, float)) or e["temperature"] < 0:
        raise ValueError(f"eval.temperature must be >= 0 (0: greedy), got {e['temperature']!r}")
    if not isinstance(e["batch_size"], int) or e["batch_size"] < 1:
        raise ValueError(f"eval.batch_size must be an integer >= 1 (prompts decoded together), got {e['batch_size']!r}")
    for key in ("warmup", "warmup_tokens"):
        if not isinstance(e[key], int) or e[key] < 0:
            raise ValueError(f"eval.{key} must be an integer >= 0, got {e[key]!r}")
    if e["limit"] is not None and (not isinstance(e["limit"], int) or e["limit"] < 1):
        raise ValueError(f"eval.limit must be null or an integer >= 1, got {e['limit']!r}")


def method_specs(e: dict[str, Any]) -> list[tuple[str, str, Any, str | None]]:
    """(name, policy, thresholds, head key) per eval.methods entry, checked; heads not loaded yet."""
    out = []
    for name, spec in (e["methods"] or {}).items():
        if name in BASELINES:
            raise ValueError(f"eval.methods.{name}: '{name}' always runs; remove it from eval.methods")
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {"policy", "thresholds", "head_dir"})
            if unknown or "thresholds" not in spec:
                raise ValueError(f"eval.methods.{name} must be a threshold list or a map with keys policy, thresholds "
                                 f"(and head_dir for judge rules); got keys {sorted(spec)}")
            policy, ths, head_key = spec.get("policy", name), spec["thresholds"], None
            if spec.get("head_dir"):
                head_key = f"methods.{name}.head_dir"
        else:
            policy, ths, head_key = name, spec, None
        if policy not in POLICIES or policy == "lossless":
            raise ValueError(f"unknown policy '{policy}' in eval.methods.{name}; known: "
                             f"{sorted(p for p in POLICIES if p != 'lossless')}")
        if policy in HEAD_DIR_KEYS and head_key is None:
            head_key = HEAD_DIR_KEYS.get(name, HEAD_DIR_KEYS[policy])
        if ths != "head_quantiles" and not isinstance(ths, (list, int, float)):
            raise ValueError(f"eval.methods.{name}: thresholds must be a list of numbers or head_quantiles, got {ths!r}")
        if ths == "head_quantiles" and head_key is None:
            raise ValueError(f"eval.methods.{name}: head_quantiles needs a judge policy with a head folder")
        out.append((name, policy, ths, head_key))
    return out


def _head_path(e: dict[str, Any], key: str) -> str | None:
    node: Any = e
    for part in key.split("."):
        node = node[part]
    return node


def build_grid(e: dict[str, Any], heads: dict[str, JudgeHead]) -> list[Method]:
    """Target-only, lossless (and draft-only), then every method's thresholds; judge methods whose head
    folder is null are skipped. Thresholds are validated here, before any decoding."""
    grid = [Method("target", "target", None), Method("lossless", "lossless", None)]
    if e["draft_only"]:
        grid.insert(1, Method("draft", "draft", None))
    for name, policy, ths, head_key in method_specs(e):
        if head_key is not None and head_key not in heads:
            continue
        if ths == "head_quantiles":
            ths = list(heads[head_key].config.thresholds.get("quantiles") or [])
            if not ths:
                raise ValueError(f"eval.methods.{name}=head_quantiles, but the head in eval.{head_key} stores no "
                                 "thresholds.quantiles: list thresholds explicitly")
        for t in ths if isinstance(ths, list) else [ths]:
            build_policy(policy, t, head=heads.get(head_key), options=e["policy_options"])
            grid.append(Method(name, policy, float(t), head_key))
    return grid


def _valid_records(path: Path) -> list[dict]:
    """Whole, distinct records of per_example.jsonl; the file is rewritten without a line cut by a kill
    or a duplicate."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    recs = []
    for line in lines:
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    recs = unique_records(recs)  # a second writer's copies (before folders were locked): dropped
    if len(recs) != len(lines) or (lines and not path.read_bytes().endswith(b"\n")):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in recs))
    return recs


def _seed(base: int, prompt_id: str) -> int:
    return (int(base) * 1_000_003 + zlib.crc32(prompt_id.encode())) % (2**63)


@stage_lock(lambda cfg: cfg.eval.output_dir, "eval.output_dir")
def run(cfg: DictConfig) -> dict[str, Any]:
    plain = OmegaConf.to_container(cfg, resolve=True)
    check_installed(plain, ["eval"])
    e = plain["eval"]
    _check(e)
    out_dir = check_writable(e["output_dir"], "eval.output_dir")
    ds = dict(e["dataset"])
    if e["limit"] is not None:
        ds["limit"] = e["limit"] if ds.get("limit") is None else min(ds["limit"], e["limit"])
    task = build_task(ds)
    specs = method_specs(e)  # config errors before the models load
    mcfg = resolve_model_config(dict(plain["model"], device=e["device"]))  # dtype auto -> bf16/fp32 here
    pair = pair_from_mapping(mcfg)
    print(f"[eval] {runtime_line(pair.runtime)}")
    dev = next(pair.target.parameters()).device
    tinfo = pair.target_info.as_dict()
    heads: dict[str, JudgeHead] = {}
    for _, _, _, key in specs:
        if key is not None and key not in heads and _head_path(e, key):
            heads[key] = load_head(_head_path(e, key), tinfo, pair.target_info.hidden_size,
                                   pair.draft_info.hidden_size, dev, key=f"eval.{key}")
    grid = build_grid(e, heads)
    skipped = [n for n, _, _, k in specs if k is not None and k not in heads]
    if skipped:
        print(f"[eval] skipping {skipped}: no head folder set (eval.judge_dir / eval.autojudge_dir)")
    examples = task.examples()
    prompts = [format_prompt(pair.tokenizer, ex.prompt, example_system_prompt(task, ex), task.chat_template)
               for ex in examples]

    # a rerun may keep records only if they were made by the same decoding settings
    key_cfg = {k: e[k] for k in ("gamma", "max_new_tokens", "temperature", "seed", "policy_options")}
    bs = e["batch_size"]
    if bs != 1:  # timings (and bf16 rounding) depend on it; left out at 1 so that older runs keep their key
        key_cfg["batch_size"] = bs
    graphs = bool(e["cuda_graphs"]) and bs == 1 and dev.type == "cuda"
    if graphs:   # timings depend on it (tokens do not); only where it acts, so that other runs keep their key
        key_cfg["cuda_graphs"] = True
    if set(pair.runtime["cpu_kernels"].values()) != {"default"}:  # the same: timings, not tokens
        key_cfg["cpu_kernels"] = pair.runtime["cpu_kernels"]
    # (limit and offset are left out: records are per prompt id, so another slice reuses the ones it shares)
    ds_key = {k: v for k, v in ds.items() if k not in ("limit", "offset")}
    run_key = config_hash({**key_cfg, "dataset": ds_key, "target": tinfo.get("fingerprint"),
                           "draft": pair.draft_info.as_dict().get("fingerprint"), "dtype": mcfg["dtype"]})
    per_path, key_path = out_dir / "per_example.jsonl", out_dir / "eval_key.json"
    if not e["resume"] or not key_path.is_file() or read_json(key_path).get("run_key") != run_key:
        if per_path.is_file() and per_path.stat().st_size:  # records of other settings: kept aside, never mixed in
            old_key = read_json(key_path).get("run_key", "unknown") if key_path.is_file() else "unknown"
            aside = out_dir / f"per_example.{str(old_key)[:12]}.jsonl"
            per_path.replace(aside)
            if key_path.is_file():
                key_path.replace(aside.with_suffix(".key.json"))
            print(f"[eval] {'eval.resume=false' if not e['resume'] else 'decoding settings changed'}: "
                  f"earlier records moved to {aside}; starting afresh")
        write_json(key_path, {"run_key": run_key, "settings": key_cfg, "dataset": ds})
    (out_dir / "summary.json").unlink(missing_ok=True)  # only a finished run has one
    records = _valid_records(per_path)
    done = {(r["method"], r["threshold"], r["prompt_id"]) for r in records}
    target_out = {r["prompt_id"]: r["output_ids"] for r in records if r["method"] == "target"}

    def policy_of(m: Method):
        return None if m.policy in ("target", "draft", "lossless") else \
            build_policy(m.policy, m.threshold, head=heads.get(m.head_key), options=e["policy_options"])

    def models_of(m: Method):
        return {"target": (pair.target, None), "draft": (pair.draft, None)}.get(m.policy, (pair.target, pair.draft))

    def run_group(m: Method, items: list, n: int) -> list:
        """(tokens, stats) per (example, prompt ids) of items: batch-1 decodes, or one batched decode."""
        model, draft = models_of(m)
        common = dict(gamma=e["gamma"], max_new_tokens=n, eos_ids=pair.eos_ids, vocab=pair.vocab_size,
                      policy=policy_of(m), temperature=float(e["temperature"]))
        seed = _seed(e["seed"], ",".join(ex.id for ex, _ in items))
        gen = torch.Generator(device=dev).manual_seed(seed) if e["temperature"] > 0 else None
        if bs == 1:
            return [decode(model, draft, items[0][1], generator=gen, profile=e["profile"], static_cache=graphs, **common)]
        return decode_batch(model, draft, [ids for _, ids in items], pad_id=pair.tokenizer.pad_token_id or 0,
                            generator=gen, **common)

    # prompts grouped for decoding: one by one, or batches of similar length (always the same batches)
    groups = [[(examples[i], prompts[i]) for i in idx] for idx in fixed_batches([len(p) for p in prompts], bs)] \
        if bs > 1 else [[x] for x in zip(examples, prompts)]
    todo = [(items, m) for group in groups for m in grid
            if (items := [(ex, ids) for ex, ids in group if (m.name, m.threshold, ex.id) not in done])]
    if todo and e["warmup"] and e["warmup_tokens"]:  # one decode per kind of method, excluded from the results
        kinds = {(m.policy, m.head_key): m for m in grid}
        # batched: one batch of the first eval.warmup prompts (through the batched engine); else one by one
        warm = [groups[0][: e["warmup"]]] if bs > 1 else groups[: e["warmup"]]
        for m in tqdm(list(kinds.values()), desc="eval warm-up", unit="decode", leave=False):
            for items in warm:
                run_group(m, items, min(e["warmup_tokens"], e["max_new_tokens"]))
    with open(per_path, "a", encoding="utf-8") as f, \
            tqdm(total=sum(len(items) for items, _ in todo), desc="eval", unit="decode") as bar:
        for items, m in todo:
            results = run_group(m, items, e["max_new_tokens"])
            for (ex, ids), (toks, st) in zip(items, results):
                text = pair.tokenizer.decode(toks, skip_special_tokens=True)
                if m.name == "target":
                    target_out[ex.id] = toks
                ref = target_out[ex.id]
                score, source = task.score(ex, text), "task"
                if score is None:  # no checker: agreement with the target's own answer
                    score, source = prefix_agreement(toks, ref), "agreement"
                rec = {"prompt_id": ex.id, "task": ex.task, "method": m.name, "policy": m.policy,
                       "threshold": m.threshold, "prompt_tokens": len(ids), "output_ids": toks, "text": text,
                       "score": score, "score_source": source, "agree_exact": float(toks == ref),
                       "agree_prefix": prefix_agreement(toks, ref),
                       "stopped_at_eos": bool(toks) and toks[-1] in pair.eos_ids, "batch_size": len(items),
                       "rounds": st.rounds, "new_tokens": st.new_tokens, "draft_forwards": st.draft_forwards,
                       "proposed": st.proposed, "accepted": st.accepted, "accepted_by_rule": st.accepted_by_rule,
                       "accept_hist": st.accept_hist, "seconds": st.seconds, "prefill_seconds": st.prefill_seconds,
                       "draft_seconds": st.draft_seconds, "verify_seconds": st.verify_seconds,
                       "rule_seconds": st.rule_seconds}
                f.write(json.dumps(rec) + "\n")
                records.append(rec)
            f.flush()
            tps = sum(st.new_tokens for _, st in results) / max(sum(st.seconds for _, st in results), 1e-9)
            bar.set_postfix_str(f"{m.name}{'' if m.threshold is None else f'@{m.threshold:g}'} {tps:.1f} tok/s")
            bar.update(len(items))

    ids_wanted = {ex.id for ex in examples}
    records = [r for r in records if r["prompt_id"] in ids_wanted]
    rows = [{**row, "policy": m.policy} for m, row in zip(grid, summary_rows(records, [(m.name, m.threshold) for m in grid]))]
    base = next(r for r in rows if r["method"] == "target")
    title = (f"{task.name}: {len(examples)} prompts, gamma={e['gamma']}, max_new_tokens={e['max_new_tokens']}, "
             f"T={e['temperature']}, batch size {bs}, target {pair.target_info.name}, draft {pair.draft_info.name}, "
             f"{runtime_line(pair.runtime)} on {dev}")
    text = write_report(rows, out_dir, title)
    summary = {"complete": True, "title": title, "task": task.name, "examples": len(examples), "gamma": e["gamma"],
               "baseline_tokens_per_s": base["tokens_per_s"], "rows": rows, "code_version": code_version(),
               "target_model": tinfo, "draft_model": pair.draft_info.as_dict(), "config": e, "runtime": pair.runtime,
               "code_isolation": isolation() if any(ex.task.startswith("humaneval") for ex in examples) else None,
               "engine": ("batch size 1, static KV cache + CUDA graphs" if graphs else
                          "batch size 1, DynamicCache rollback" if bs == 1 else
                          f"batch size {bs}, masked KV holes for rejected tokens") + ", one verify pass per round"}
    write_json(out_dir / "summary.json", summary)
    if plain["logger"]["name"] == "wandb":
        _log_wandb(plain, rows)
    print(text)
    lossless = next(r for r in rows if r["method"] == "lossless")
    return {"examples": len(examples), "rows": len(rows), "output_dir": str(out_dir),
            "baseline_tokens_per_s": base["tokens_per_s"], "lossless_speedup": lossless["speedup"],
            "best_speedup": {r["method"]: max(x["speedup"] or 0.0 for x in rows if x["method"] == r["method"])
                             for r in rows}}


def _log_wandb(plain: dict, rows: list[dict]) -> None:
    import wandb

    lg = plain["logger"]
    run = wandb.init(project=lg["project"], entity=lg["entity"], mode=lg["mode"], tags=[*lg["tags"], "eval"],
                     config=plain, dir=plain["run_dir"], job_type="eval")
    cols = ["method", "threshold", "accuracy", "agreement_exact", "agreement_prefix", "mean_accepted_length",
            "acceptance_rate", "tokens_per_s", "speedup", "accept_hist"]
    run.log({"eval/results": wandb.Table(columns=cols, data=[[r[c] if c != "accept_hist" else str(r[c]) for c in cols]
                                                             for r in rows])})
    run.summary.update({f"eval/{r['method']}@{r['threshold']}/speedup": r["speedup"] for r in rows})
    run.finish()
