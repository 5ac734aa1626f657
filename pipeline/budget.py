"""``pipeline.budget_minutes``: measure this machine at warm-up and size the run to fit (selfjudge.budget).

The plan is stored in ``${run_dir}/budget_plan.json`` with a hash of the settings it was made for, and a
rerun with the same settings reuses it without measuring again: the cuts (and so the stage hashes) stay
the same, and finished stages are still skipped.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from selfjudge.budget import Plan, RunSize, measure_rates, plan
from selfjudge.io import config_hash, read_json, write_json

HEAD_QUANTILES = 3  # thresholds a head_quantiles entry usually expands to (the head's stored sweep)
MARGIN_S = 60.0  # kept back for loading, writing reports and the unforeseen
PLAN_FILE = "budget_plan.json"


log = logging.getLogger("selfjudge.pipeline")  # hydra's console and per-rank log file show it


def _prompt_count(ds: dict, limit: int | None = None) -> int:
    from selfjudge.tasks import build_task

    ds = dict(ds)
    if limit is not None:
        ds["limit"] = limit if ds.get("limit") is None else min(ds["limit"], limit)
    return len(build_task(ds).examples())


def _eval_decodes(e: dict) -> tuple[int, int]:
    """(decodes per prompt, policy kinds) from eval.methods, counted before any head exists."""
    n, kinds = 2 + bool(e.get("draft_only")), 2 + bool(e.get("draft_only"))
    for spec in (e.get("methods") or {}).values():
        ths = spec.get("thresholds") if isinstance(spec, dict) else spec
        k = HEAD_QUANTILES if ths == "head_quantiles" else len(ths) if isinstance(ths, list) else 1
        n, kinds = n + k, kinds + (k > 0)
    return n, kinds


def run_size(plain: dict, stages: list[str]) -> RunSize:
    """What ``stages`` will do under this config (a stage left out counts as empty)."""
    d, e = plain["data_gen"], plain["eval"]
    decodes, kinds = _eval_decodes(e)
    has_gen, has_eval = "data_gen" in stages, "eval" in stages
    return RunSize(
        gen_prompts=_prompt_count(d["dataset"]) if has_gen else 0,
        gen_tokens=int(d["max_new_tokens"]),
        eval_prompts=_prompt_count(e["dataset"], e.get("limit")) if has_eval else 0,
        eval_tokens=int(e["max_new_tokens"]),
        gen_batch=int(d["batch_size"]),
        window=int(d["window"]),
        eval_decodes=decodes,
        warmup_tokens=kinds * int(e["warmup"]) * min(int(e["warmup_tokens"]), int(e["max_new_tokens"]))
        if has_eval
        else 0,
    )


def _apply(cfg: DictConfig, before: RunSize, after: RunSize) -> dict[str, Any]:
    """Set the config keys of the knobs that were cut; returns them."""
    keys = {
        "gen_prompts": "data_gen.dataset.limit",
        "gen_tokens": "data_gen.max_new_tokens",
        "eval_prompts": "eval.limit",
        "eval_tokens": "eval.max_new_tokens",
    }
    changed = {keys[k]: getattr(after, k) for k in keys if getattr(after, k) != getattr(before, k)}
    with open_dict(cfg):
        for key, value in changed.items():
            OmegaConf.update(cfg, key, value, merge=False)
    return changed


def fit_to_budget(cfg: DictConfig, stages: list[str], started: float) -> Plan | None:
    """Measure (or reuse the stored plan), cut the run to ``pipeline.budget_minutes``, print what and why."""
    minutes = cfg.pipeline.get("budget_minutes")
    if not minutes:
        return None
    plain = OmegaConf.to_container(cfg, resolve=True)
    size = run_size(plain, stages)
    base = config_hash({"size": size.__dict__, "model": plain["model"], "budget_minutes": minutes})
    path = Path(str(cfg.run_dir)) / PLAN_FILE
    saved = read_json(path) if path.is_file() else {}
    if saved.get("base_hash") == base:
        p = Plan(
            RunSize(**saved["plan"]["size"]),
            saved["plan"]["seconds"],
            saved["plan"]["budget_s"],
            saved["plan"]["cuts"],
            saved["plan"]["fits"],
        )
        log.info(f"budget: the plan of {saved['made_at']} for these settings ({path}): {p.describe()}")
    else:
        from selfjudge.models import pair_from_mapping

        log.info(f"budget {minutes} min: loading the pair and timing a few steps (warm-up) ...")
        pair = pair_from_mapping(plain["model"])
        t0 = time.perf_counter()
        rates = measure_rates(pair.target, pair.draft, size.gen_batch)
        log.info(f"warm-up ({time.perf_counter() - t0:.0f} s): {rates.describe()}")
        del pair
        gc.collect()
        budget_s = float(minutes) * 60 - (time.perf_counter() - started) - MARGIN_S
        p = plan(size, rates, budget_s)
        log.info(f"budget: {p.describe()}")
        write_json(
            path,
            {
                "base_hash": base,
                "made_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "rates": rates.__dict__,
                "plan": p.as_dict(),
                "settings": size.__dict__,
            },
        )
    changed = _apply(cfg, size, p.size)
    if changed:
        log.info(f"budget: set {', '.join(f'{k}={v}' for k, v in changed.items())}")
    return p
